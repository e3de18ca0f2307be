"""DDIM sampling with classifier-free guidance over the joint (text + reference group) condition.

The sampler reuses the base SDXL parts of a :class:`~easyref.base_models.BaseModels` bundle (text encoders, prompt
encoding, VAE, image post-processing, the DDIM schedule) and drives the UNet itself, so that:

* the reference group of each prompt is encoded by the MLLM once per call and reused for every step and image;
  inside :meth:`EasyRefSampler.reuse_references`, once per (group, caption) for all calls (other seeds, methods);
* at reference scale 0 (text-only SDXL) the reference branch is skipped, so the MLLM does not run at all;
* one joint guidance is applied: ``eps_u + w * (eps_c - eps_u)``, where the unconditional branch is the negative
  prompt plus the MLLM's encoding of (one black image, empty caption);
* for the same seed, size, steps and negative prompt, the initial latents, timesteps and time ids are those of
  ``diffusers.StableDiffusionXLPipeline`` with a ``DDIMScheduler``: at adapter scale 0 the images are the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from easyref.base_models import BaseModels
from easyref.captions import CaptionFit
from easyref.errors import UserError
from easyref.model import EasyRef, ModelConfig, ReferenceProcessor, adapter_processors, common_length, load_model

if TYPE_CHECKING:
    from PIL import Image

    from easyref.sampler_speed import SpeedOptions


@dataclass(kw_only=True)
class SamplerConfig:
    """Inference defaults (the paper's: DDIM, 30 steps, guidance 7.5)."""

    steps: int = 30
    """DDIM denoising steps."""
    guidance: float = 7.5
    """Classifier-free guidance weight w; 1 or less disables guidance (one UNet pass per step)."""
    negative_prompt: str = ""
    """Text of the unconditional branch."""
    eta: float = 0.0
    """DDIM eta (0 = deterministic DDIM)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def base_paths(base: str | Path) -> tuple[Path, Path]:
    """``(sdxl, mllm)`` folders inside ``base``, with a clear error when either is missing."""
    base = Path(base)
    sdxl, mllm = base / "sdxl", base / "mllm"
    for path, what in (
        (sdxl / "model_index.json", "an SDXL diffusers folder"),
        (mllm / "config.json", "a Qwen2-VL folder"),
    ):
        if not path.is_file():
            raise UserError(
                f"{base}: expected {what} at {path.parent} (missing {path.name}); build the tiny models with "
                "`easyref tiny-models --out models/tiny` or point --base at a folder holding sdxl/ and mllm/"
            )
    return sdxl, mllm


class EasyRefSampler:
    """Generates images from prompts and groups of reference images with a (trained) :class:`EasyRef`."""

    def __init__(self, model: EasyRef, base: BaseModels):
        if base.processor is None:
            raise ValueError("the sampler needs base models loaded with the MLLM's reference processor")
        self.model = model
        self.base = base
        self.processor: ReferenceProcessor = base.processor
        # The SDXL pipeline over the shared base parts supplies prompt encoding, VAE and post-processing; its UNet
        # is EasyRef's, its scheduler the base's DDIM.
        self.pipe = base.pipeline(model.unet, base.sample_scheduler)

    @classmethod
    def from_pretrained(
        cls,
        sdxl: str | Path,
        mllm: str | Path,
        checkpoint: str | Path | None = None,
        model_config: ModelConfig | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | None = None,
    ) -> EasyRefSampler:
        """The model (base + checkpoint) and its own :class:`BaseModels`; to share the base with other consumers,
        load it once with ``BaseModels.load`` and pass it to the constructor."""
        model = load_model(sdxl, mllm, checkpoint=checkpoint, config=model_config, torch_dtype=torch_dtype)
        base = BaseModels.load(sdxl, mllm, model.config, device=device, torch_dtype=torch_dtype)
        return cls(model, base).to(device)

    def to(self, device: str | torch.device) -> EasyRefSampler:
        self.pipe.to(device)
        self.model.to(device)
        return self

    def speed_up(self, options: SpeedOptions) -> EasyRefSampler:
        """Apply opt-in speed / memory options (fused self-attention q/k/v, channels_last, compile, VAE slicing and
        tiling) in place; see :mod:`easyref.sampler_speed`."""
        from easyref.sampler_speed import apply_speed_options

        apply_speed_options(self.model.unet, self.pipe.vae, options)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.unet.device

    _reused: dict[tuple[tuple[str, ...], str], torch.Tensor] | None = None
    """Reference states by (group fingerprint, caption) while :meth:`reuse_references` is active."""

    @contextmanager
    def reuse_references(self) -> Iterator[None]:
        """Inside, every (reference group, caption) is encoded by the MLLM once and its states are reused by all
        later calls (other seeds, other methods, the unconditional group of every call).

        Each pair is encoded alone (a batch of one), so its states do not depend on which other samples share a
        batch; outside the block a batch is encoded together, left-padded, which moves the padded samples' states
        by float rounding (about 1e-6). Groups are recognised by their pixels, not by object identity. The
        weights must not change inside the block (do not train in it). Nested blocks share the outer cache.
        """
        outer = self._reused
        if outer is None:
            self._reused = {}
        try:
            yield
        finally:
            self._reused = outer

    @torch.no_grad()
    def encode_references(
        self, references: Sequence[Sequence[Image.Image] | None], captions: Sequence[str]
    ) -> torch.Tensor:
        """MLLM group representations ``(B, num_tokens, hidden)``; ``None`` references stand for a dropped group."""
        if self._reused is None:
            return self._encode(references, captions)
        if len(references) != len(captions):
            raise ValueError(f"{len(references)} reference groups but {len(captions)} captions")
        states = []
        for group, caption in zip(references, captions, strict=True):
            key = (group_fingerprint(group), caption)
            if key not in self._reused:
                self._reused[key] = self._encode([group], [caption])
            states.append(self._reused[key])
        return torch.cat(common_length(states))

    def _encode(self, references: Sequence[Sequence[Image.Image] | None], captions: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(references, captions)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.model.encode_references(inputs)

    def reference_scale_is_zero(self, scale: float | None = None) -> bool:
        """Whether the reference branch is off for a call with ``scale`` (None = the installed scale)."""
        if scale is not None:
            return scale == 0
        return all(s == 0 for p in adapter_processors(self.model.unet) for s in p.scale)

    def _placeholder_states(self, n: int) -> torch.Tensor:
        """States for a call at reference scale 0: the attention skips the branch, so their values never matter."""
        encoder = self.model.reference_encoder
        return encoder.ref_tokens.new_zeros(n, encoder.ref_tokens.shape[0], encoder.hidden_size)

    def encode_unconditional(self) -> torch.Tensor:
        """``(1, num_tokens, hidden)``: the MLLM's encoding of (one black image, empty caption)."""
        return self.encode_references([None], [""])

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        references: Sequence[Sequence[Image.Image]] | None = None,
        *,
        reference_states: torch.Tensor | None = None,
        negative_reference_states: torch.Tensor | None = None,
        negative_prompt: str = "",
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | int | None = None,
        scale: float | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> list[Image.Image] | torch.Tensor:
        """Images for each prompt (``num_images_per_prompt`` each, prompt-major order).

        ``references[i]`` is the group of prompt i; alternatively pass precomputed ``reference_states`` (from
        :meth:`encode_references`), and ``negative_reference_states`` (from :meth:`encode_unconditional`) to skip
        encoding the unconditional group on every call. ``scale`` overrides the adapter scale for this call; at
        scale 0 (text-only) ``references`` may be None and the MLLM does not run. ``output_type`` is ``"pil"``,
        ``"np"``, ``"pt"`` or ``"latent"``.
        """
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = len(prompts)
        text_only = self.reference_scale_is_zero(scale)
        if text_only:  # the branch is skipped: no MLLM pass for either branch
            reference_states, negative_reference_states = self._placeholder_states(batch), self._placeholder_states(1)
        elif reference_states is None:
            if references is None or len(references) != batch:
                raise UserError(
                    f"need one reference group per prompt: {batch} prompts, "
                    f"{0 if references is None else len(references)} groups"
                )
            reference_states = self.encode_references(references, prompts)
        unet, device = self.model.unet, self.device
        do_cfg = guidance_scale > 1.0
        sample_size = unet.config.sample_size * self.pipe.vae_scale_factor
        height, width = height or sample_size, width or sample_size
        factor = self.pipe.vae_scale_factor
        if height % factor or width % factor:
            raise UserError(f"height and width must be multiples of {factor}, got {height}x{width}")
        if isinstance(generator, int):
            generator = torch.Generator(device="cpu").manual_seed(generator)

        text, negative_text, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=CaptionFit.shared(self.pipe)(prompts),
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
        )
        states = reference_states.to(device=device, dtype=text.dtype).repeat_interleave(num_images_per_prompt, 0)
        n = batch * num_images_per_prompt
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=text.dtype).repeat(n, 1)
        if do_cfg:
            uncond = self.encode_unconditional() if negative_reference_states is None else negative_reference_states
            uncond = uncond.to(device=device, dtype=text.dtype).expand(n, -1, -1)
            text = torch.cat([negative_text, text])
            pooled = torch.cat([negative_pooled, pooled])
            states = torch.cat(common_length([uncond, states]))  # aggregation "concat": counts may differ
            time_ids = torch.cat([time_ids, time_ids])

        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (n, unet.config.in_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
        latents = latents * scheduler.init_noise_sigma
        added = {"text_embeds": pooled, "time_ids": time_ids, "image_embeds": [states[:, None]]}
        extra = {"eta": eta, "generator": generator}

        previous_scale = [p.scale for p in adapter_processors(unet)]
        if scale is not None:
            self.model.set_scale(scale)
        try:
            for t in tqdm(scheduler.timesteps, desc="denoising", disable=not progress, leave=False):
                model_in = torch.cat([latents, latents]) if do_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                eps = unet(model_in, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]
                if do_cfg:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        finally:
            for proc, s in zip(adapter_processors(unet), previous_scale, strict=True):
                proc.scale = s
        if output_type == "latent":
            return latents
        return self.decode(latents, output_type)

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """VAE-decode latents the way the SDXL pipeline does (fp16 VAEs are upcast to fp32)."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


def group_fingerprint(group: Sequence[Image.Image] | None) -> tuple[str, ...]:
    """A reference group by its pixels: one digest per image (mode, size and bytes); ``()`` for a dropped group."""
    digests = []
    for image in group or ():
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
        digests.append(h.hexdigest())
    return tuple(digests)
