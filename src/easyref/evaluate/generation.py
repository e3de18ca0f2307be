"""Generation per method with the checkpoint's sampler: EasyRef, EasyRef with swapped references, text-only SDXL.

Each sample is generated with its own seed (derived from ``evaluate.seed`` and the sample id), so an image does
not depend on batching or on which other samples are evaluated; every method uses the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.samples import ImageStore, Sample
    from easyref.sampler import EasyRefSampler


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def seeded_generators(batch: Sequence[Sample]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with the sample's seed (the same for every method)."""
    import torch

    return [torch.Generator().manual_seed(s.seed) for s in batch]


def generate_easyref(
    sampler: EasyRefSampler,
    samples: Sequence[Sample],
    store: ImageStore,
    config: EvaluateConfig,
    *,
    text_only: bool = False,
    references: Sequence[Sequence[Path]] | None = None,
) -> list[Image.Image]:
    """One image per sample with the EasyRef sampler at ``config.reference_scale``; ``text_only`` = reference scale 0
    and any LoRA disabled;
    ``references`` replaces each sample's own reference group (the swapped-reference check)."""
    from tqdm.auto import tqdm

    unet = sampler.model.unet
    lora = bool(getattr(unet, "peft_config", None))
    if text_only and lora:
        unet.disable_adapters()
    images: list[Image.Image] = []
    groups = list(references) if references is not None else [s.references for s in samples]
    try:
        desc = "text-only SDXL" if text_only else "easyref" if references is None else "easyref, swapped references"
        bar = tqdm(total=len(samples), desc=f"generating ({desc})", unit="image")
        for start in range(0, len(samples), config.batch_size):
            batch = samples[start : start + config.batch_size]
            images += sampler(
                [s.caption for s in batch],
                [store.group(g) for g in groups[start : start + len(batch)]],
                negative_prompt=config.negative_prompt,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=seeded_generators(batch),
                scale=0.0 if text_only else config.reference_scale,
                progress=False,
            )
            bar.update(len(batch))
        bar.close()
    finally:
        if text_only and lora:
            unet.enable_adapters()
    return images
