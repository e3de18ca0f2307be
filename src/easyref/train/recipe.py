"""The EasyRef training recipe: frozen conditioning, classifier-free-guidance drops and the epsilon-MSE loss.

Per sample, one draw decides the CFG drop (the paper's recipe): with ``drop_image`` the references become one
black image (``None`` group), with ``drop_text`` the caption becomes empty for both the MLLM and the SDXL text
encoders, with ``drop_both`` both happen. The target is VAE-encoded (``scaling_factor``), noised with the base
model's DDPM schedule at ``t ~ U{0..999}`` (plus offset noise with ``noise_offset``), and the model predicts the
noise.

All randomness of a micro-step comes from one generator seeded by ``(seed, step, micro-step, rank)``, so a resumed
run draws exactly what the uninterrupted run drew.

The work is split by where it runs. :class:`PrepareBatch` is the CPU half, the DataLoader's collate function (so in
its worker processes with ``num_workers > 0``): it stacks the decoded samples, draws each sample's drop (the first
draw of the micro-step's generator) and runs the MLLM processor (image resize and patchify, chat template,
tokenisation) on what was kept. :class:`Conditioner` is the frozen-model half on the training device: it repeats the
drop draw from the same generator (so the draws after it are the ones it always made, and a batch prepared for
another micro-step is refused), then encodes the target and the captions and noises the latents.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from easyref.captions import CaptionFit
from easyref.model import EasyRef, ReferenceProcessor
from easyref.train.cache import ConditioningCache, caption_key, target_key

if TYPE_CHECKING:
    from easyref.base_models import BaseModels
    from easyref.train.config import TrainConfig


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 with ``mixed_precision: bf16``, or ``auto`` on a GPU; else ``None`` (float32)."""
    if config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for ``None``."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def training_noise(shape: torch.Size, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``shape`` (batch, channels, ...), plus ``offset`` x one normal draw per sample and channel
    (offset noise; none drawn when ``offset`` is 0)."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], *[1] * (len(shape) - 2)), generator=generator)
    return noise


def draw_drops(
    batch: int, p_text: float, p_image: float, p_both: float, generator: torch.Generator
) -> tuple[list[bool], list[bool]]:
    """Per sample ``(drop_text, drop_image)`` from one uniform draw: image, text, both or none are exclusive."""
    u = torch.rand(batch, generator=generator).tolist()
    text, image = [], []
    for x in u:
        drop_image = x < p_image
        drop_text = p_image <= x < p_image + p_text
        both = p_image + p_text <= x < p_image + p_text + p_both
        text.append(drop_text or both)
        image.append(drop_image or both)
    return text, image


def apply_drops(
    references: list[Any], captions: list[str], drop_text: list[bool], drop_image: list[bool]
) -> tuple[list[Any], list[str]]:
    """Dropped references become ``None`` (the processor's black image), dropped captions ``""``."""
    groups = [None if d else g for g, d in zip(references, drop_image, strict=True)]
    return groups, ["" if d else c for c, d in zip(captions, drop_text, strict=True)]


class PrepareBatch:
    """The DataLoader's collate function: samples (with the ``position`` :class:`~easyref.train.data.EpochIndexed`
    records) to a batch whose references are already MLLM inputs (``reference_inputs``), with the drops drawn.

    Runs in the DataLoader workers when there are any; pickled into them, so it holds only the processor and numbers.
    """

    def __init__(self, processor: ReferenceProcessor, drops: tuple[float, float, float], seed: int, rank: int):
        self.processor, self.drops, self.seed, self.rank = processor, drops, seed, rank

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        from easyref.train.data import collate

        positions = {tuple(s["position"]) for s in samples}
        if len(positions) != 1:
            raise ValueError(f"one micro-batch holds samples of several micro-steps {sorted(positions)}")
        (step, micro) = positions.pop()
        batch = collate(samples)
        generator = step_generator(self.seed, step, micro, self.rank)
        drop_text, drop_image = draw_drops(len(samples), *self.drops, generator)
        groups, captions = apply_drops(batch.pop("references"), batch["caption"], drop_text, drop_image)
        batch["reference_inputs"] = dict(self.processor(groups, captions))
        batch["drops"] = (drop_text, drop_image)
        return batch


def sdxl_time_ids(batch: dict[str, Any]) -> torch.Tensor:
    """``(B, 6)`` SDXL micro-conditioning: original size (h, w), crop top-left (top, left), target size (h, w).

    From the batch's ``original_size`` and ``crop_top_left`` (what the datasets record while resizing and cropping
    each target), as SDXL was trained; a batch without them gets ``(H, W, 0, 0, H, W)``.
    """
    target = batch["target"]
    n, (height, width) = target.shape[0], target.shape[-2:]
    size = torch.tensor([[height, width]]).expand(n, 2)
    original = batch.get("original_size")
    crop = batch.get("crop_top_left")
    original = size if original is None else torch.as_tensor(original).reshape(n, 2)
    crop = torch.zeros(n, 2, dtype=torch.long) if crop is None else torch.as_tensor(crop).reshape(n, 2)
    return torch.cat([original, crop, size], dim=1).float()


@dataclass
class Conditioned:
    """One micro-batch, ready for the trainable model."""

    reference_inputs: dict[str, torch.Tensor]
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    text_states: torch.Tensor
    pooled_text: torch.Tensor
    time_ids: torch.Tensor
    noise: torch.Tensor


class Conditioner:
    """The frozen half of a training step: VAE, both SDXL text encoders, the reference processor, the DDPM schedule.

    All of them come from ``base`` (the :class:`~easyref.base_models.BaseModels` the sampler shares) and run under
    ``torch.no_grad`` on its device. ``processor`` overrides the base's reference processor (``None`` with a base
    without one: a conditioner for SDXL alone, which :meth:`encode_latents` and :meth:`encode_text` serve).
    ``cache``: an optional :class:`~easyref.train.cache.ConditioningCache` of VAE posteriors and text states.
    """

    def __init__(
        self,
        base: BaseModels,
        drops: tuple[float, float, float],
        processor: ReferenceProcessor | None = None,
        cache: ConditioningCache | None = None,
        noise_offset: float = 0.0,
    ):
        self.base, self.processor, self.cache = base, processor or base.processor, cache
        self.scheduler, self.device = base.noise_scheduler, base.device
        self.drops, self.noise_offset = drops, noise_offset
        self.captions = CaptionFit.for_pipeline(base)  # the training captions' own counts (not the previews')

    def prepare(self, seed: int, rank: int) -> PrepareBatch:
        """The collate function that does this conditioner's CPU half (with its processor and drop rates)."""
        return PrepareBatch(self.processor, self.drops, seed, rank)

    @torch.no_grad()
    def encode_latents(self, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior. The VAE runs outside any autocast the step is under, in
        its own dtype (float32 for training, as the authors keep SDXL's VAE): bf16 encodings would drift. With a
        cache, the posterior's parameters are read from it when every sample of the batch is there; the noise is
        drawn from ``generator`` either way."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae, cache = self.base.vae, self.cache
        keys = [target_key(t) for t in target] if cache is not None else []
        found = cache.latents.lookup(keys) if cache is not None else None
        if found is not None:
            parameters = torch.stack([f["parameters"] for f in found]).to(self.device, vae.dtype)
        else:
            with torch.autocast(self.device.type, enabled=False):
                parameters = vae.encode(target.to(self.device, vae.dtype)).latent_dist.parameters
            for key, p in zip(keys, parameters, strict=False):
                cache.latents.put(key, {"parameters": p})  # type: ignore[union-attr]
        posterior = DiagonalGaussianDistribution(parameters)
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both SDXL text encoders' states and the pooled state of the captions, cut to 77 tokens (and counted);
        with a cache, read from it when every caption of the batch is there."""
        captions, cache = self.captions(captions), self.cache
        keys = [caption_key(c) for c in captions] if cache is not None else []
        found = cache.text.lookup(keys) if cache is not None else None
        if found is not None:
            text = torch.stack([f["text"] for f in found]).to(self.device)
            return text, torch.stack([f["pooled"] for f in found]).to(self.device)
        text, _, pooled, _ = self.base.encode_prompt(
            captions, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        for key, t, p in zip(keys, text, pooled, strict=False):
            cache.text.put(key, {"text": t, "pooled": p})  # type: ignore[union-attr]
        return text, pooled

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> Conditioned:
        """``batch``: from :class:`PrepareBatch` (references already MLLM inputs) or raw (``references`` as PIL
        groups, processed here); ``generator``: the micro-step's :func:`step_generator`."""
        n = len(batch["caption"])
        drop_text, drop_image = draw_drops(n, *self.drops, generator)
        groups, captions = apply_drops(batch.get("references", [None] * n), batch["caption"], drop_text, drop_image)
        if "reference_inputs" in batch:
            if tuple(batch["drops"]) != (drop_text, drop_image):
                raise RuntimeError(
                    "this batch was prepared for another micro-step (its CFG drops differ from this step's draw); "
                    "the loader and the step generator are out of step"
                )
            inputs = batch["reference_inputs"]
        else:
            inputs = self.processor(groups, captions)
        target = batch["target"]
        latents = self.encode_latents(target, generator)
        text, pooled = self.encode_text(captions)
        noise = training_noise(latents.shape, self.noise_offset, generator).to(self.device, latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        time_ids = sdxl_time_ids(batch).to(self.device, text.dtype)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        return Conditioned(inputs, noisy, timesteps, text, pooled, time_ids, noise)


class DiffusionObjective(nn.Module):
    """The trainable forward of one step (what DDP wraps): encode references, predict noise, MSE to the noise."""

    def __init__(self, model: EasyRef):
        super().__init__()
        self.model = model

    def forward(self, c: Conditioned) -> torch.Tensor:
        states = self.model.encode_references(c.reference_inputs)
        eps = self.model(c.noisy_latents, c.timesteps, c.text_states, c.pooled_text, c.time_ids, states)
        return F.mse_loss(eps.float(), c.noise.float())
