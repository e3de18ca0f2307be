"""The EasyRef training recipe: frozen conditioning, classifier-free-guidance drops and the epsilon-MSE loss.

Per sample, one draw decides the CFG drop (the paper's recipe): with ``drop_image`` the references become one
black image (``None`` group), with ``drop_text`` the caption becomes empty for both the MLLM and the SDXL text
encoders, with ``drop_both`` both happen. The target is VAE-encoded (``scaling_factor``), noised with the base
model's DDPM schedule at ``t ~ U{0..999}``, and the model predicts the noise.

All randomness of a micro-step comes from one generator seeded by ``(seed, step, micro-step, rank)``, so a resumed
run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from easyref.captions import CaptionFit
from easyref.model import EasyRef, ReferenceProcessor


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator that depends only on its arguments."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_drops(batch: int, p_text: float, p_image: float, p_both: float, generator: torch.Generator) -> tuple[list[bool], list[bool]]:
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

    ``pipe`` is the SDXL pipeline the sampler holds (its VAE, text encoders and ``encode_prompt``); all of it runs
    under ``torch.no_grad``.
    """

    def __init__(self, pipe: Any, processor: ReferenceProcessor, scheduler: Any, device: torch.device,
                 drops: tuple[float, float, float]):
        self.pipe, self.processor, self.scheduler, self.device = pipe, processor, scheduler, device
        self.p_text, self.p_image, self.p_both = drops
        self.captions = CaptionFit.for_pipeline(pipe)  # the training captions' own counts (not the previews')
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False).eval()

    @classmethod
    def from_pipeline(cls, pipe: Any, processor: ReferenceProcessor, sdxl: Any, device: torch.device,
                      drops: tuple[float, float, float]) -> Conditioner:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(sdxl, subfolder="scheduler")
        return cls(pipe, processor, scheduler, device, drops)

    @torch.no_grad()
    def encode_latents(self, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        posterior = vae.encode(target.to(self.device, vae.dtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device, posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        text, _, pooled, _ = self.pipe.encode_prompt(
            prompt=self.captions(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return text, pooled

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> Conditioned:
        n = len(batch["caption"])
        drop_text, drop_image = draw_drops(n, self.p_text, self.p_image, self.p_both, generator)
        captions = ["" if d else c for c, d in zip(batch["caption"], drop_text, strict=True)]
        groups = [None if d else g for g, d in zip(batch["references"], drop_image, strict=True)]
        target = batch["target"]
        latents = self.encode_latents(target, generator)
        text, pooled = self.encode_text(captions)
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        height, width = target.shape[-2:]
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=text.dtype, device=self.device)
        inputs = {k: v.to(self.device) for k, v in self.processor(groups, captions).items()}
        return Conditioned(inputs, noisy, timesteps, text, pooled, time_ids.repeat(n, 1), noise)


class DiffusionObjective(nn.Module):
    """The trainable forward of one step (what DDP wraps): encode references, predict noise, MSE to the noise."""

    def __init__(self, model: EasyRef):
        super().__init__()
        self.model = model

    def forward(self, c: Conditioned) -> torch.Tensor:
        states = self.model.encode_references(c.reference_inputs)
        eps = self.model(c.noisy_latents, c.timesteps, c.text_states, c.pooled_text, c.time_ids, states)
        return F.mse_loss(eps.float(), c.noise.float())
