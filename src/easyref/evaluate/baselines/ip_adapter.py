"""IP-Adapter-SDXL through diffusers' ``load_ip_adapter``, conditioned on the mean CLIP image embedding of the group
(the paper's multi-reference baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.captions import CaptionFit
from easyref.errors import UserError
from easyref.evaluate.generation import batches, seeded_generators

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from easyref.evaluate.config import EvaluateConfig, IPAdapterConfig
    from easyref.evaluate.samples import ImageStore, Sample

NAME = "ip_adapter"
LABEL = "IP-Adapter-SDXL (mean)"
GRID_LABEL = "ip-adapter"


def load(sdxl: str | Path, config: EvaluateConfig, device: str, torch_dtype: torch.dtype | None) -> IPAdapterBaseline:
    return IPAdapterBaseline.from_pretrained(sdxl, config.ip_adapter, device=device, torch_dtype=torch_dtype)


class IPAdapterBaseline:
    """IP-Adapter-SDXL through diffusers, conditioned on the mean CLIP image embedding of each group."""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @classmethod
    def from_pretrained(
        cls, sdxl: str | Path, config: IPAdapterConfig, device: str = "cpu", torch_dtype: torch.dtype | None = None
    ) -> IPAdapterBaseline:
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        encoder = config.image_encoder_folder
        subfolder = encoder if "/" in encoder else f"{config.subfolder}/{encoder}"
        # Passing the processor keeps diffusers from building a torchvision-backed CLIPImageProcessor.
        feature_extractor = _clip_image_processor(str(config.path), subfolder)
        pipe = StableDiffusionXLPipeline.from_pretrained(
            sdxl, feature_extractor=feature_extractor, torch_dtype=torch_dtype
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        try:
            pipe.load_ip_adapter(
                config.path,
                subfolder=config.subfolder,
                weight_name=config.weight_name,
                image_encoder_folder=config.image_encoder_folder,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(
                f"cannot load the IP-Adapter baseline from {config.path!r} (evaluate.ip_adapter): {exc}"
            ) from exc
        pipe.set_ip_adapter_scale(config.scale)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device))

    def group_embedding(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(1, D)``: the mean projected CLIP image embedding of a group."""
        import torch

        encoder = self.pipe.image_encoder
        pixels = self.pipe.feature_extractor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            embeds = encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds
        return embeds.mean(dim=0, keepdim=True)

    def __call__(self, samples: Sequence[Sample], store: ImageStore, config: EvaluateConfig) -> list[Image.Image]:
        import torch
        from tqdm.auto import tqdm

        images: list[Image.Image] = []
        bar = tqdm(total=len(samples), desc="generating (ip_adapter)", unit="image")
        for batch in batches(samples, config.batch_size):
            positive = torch.stack([self.group_embedding(store.group(s.references)) for s in batch])  # (B, 1, D)
            embeds = torch.cat([torch.zeros_like(positive), positive]) if config.guidance > 1 else positive
            images += self.pipe(
                prompt=CaptionFit.shared(self.pipe)([s.caption for s in batch]),
                negative_prompt=[config.negative_prompt] * len(batch),
                ip_adapter_image_embeds=[embeds],
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=seeded_generators(batch),
            ).images
            bar.update(len(batch))
        bar.close()
        return images


def _clip_image_processor(path: str, subfolder: str) -> Any:
    """The image encoder's processor files if present, else what diffusers builds: resize + crop to its input size."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    try:
        return CLIPImageProcessorPil.from_pretrained(path, subfolder=subfolder)
    except OSError:
        pass
    try:
        side = CLIPVisionConfig.from_pretrained(path, subfolder=subfolder).image_size
    except OSError as exc:
        raise UserError(
            f"no IP-Adapter image encoder at {path!r} / {subfolder!r} (evaluate.ip_adapter): {exc}"
        ) from exc
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
