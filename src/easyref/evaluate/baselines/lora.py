"""Per-group LoRA, the paper's tuning-based baseline: for each evaluated group, a LoRA (rank 32) on the base SDXL
UNet's attention q, k, v, out is fine-tuned on the group's reference images and their captions with the training
loss (epsilon MSE at DDPM timesteps, the recipe's ``Conditioner``), then the group's samples are generated text-only
(the base SDXL has no reference branch) with the same seeds as every other method. The LoRA is removed before the
next group, so no group sees another's tuning.

Held-out groups are handled the same way: nothing of any evaluated group was seen before its own tuning.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from easyref.captions import CaptionFit
from easyref.evaluate.generation import batches, seeded_generators
from easyref.evaluate.samples import sample_seed

if TYPE_CHECKING:
    from PIL import Image

    from easyref.base_models import BaseModels
    from easyref.evaluate.config import EvaluateConfig, LoraBaselineConfig
    from easyref.evaluate.samples import ImageStore, Sample

NAME = "lora"
LABEL = "Per-group LoRA (SDXL, text only)"
GRID_LABEL = "lora"
ADAPTER = "group_lora"


def load(base: BaseModels, config: EvaluateConfig) -> LoraBaseline:
    return LoraBaseline(base)


class LoraBaseline:
    """A base SDXL UNet over the shared base models (DDIM for sampling) and the recipe's conditioner (VAE, text
    encoders, DDPM noise)."""

    def __init__(self, base: BaseModels):
        from easyref.train.recipe import Conditioner

        self.pipe = base.pipeline(base.load_unet())
        self.pipe.set_progress_bar_config(disable=True)
        # Only the frozen encoders and the DDPM schedule of the conditioner are used: no reference processor.
        self.conditioner = Conditioner(base, (0.0, 0.0, 0.0))
        self.tuning_seconds: dict[str, float] = {}
        """Fine-tuning wall time of each group (generation excluded)."""

    def size(self, config: EvaluateConfig) -> tuple[int, int]:
        """``(height, width)`` of training and generation: the configured size or the UNet's native one."""
        native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return config.height or native, config.width or native

    def tune(self, sample: Sample, store: ImageStore, config: EvaluateConfig) -> list[float]:
        """Attach a fresh LoRA and fine-tune it on ``sample``'s group; the per-step losses."""
        import torch
        import torch.nn.functional as F
        from peft import LoraConfig

        from easyref.model import LORA_TARGETS
        from easyref.train.recipe import step_generator, training_noise

        lora: LoraBaselineConfig = config.lora_baseline
        unet, c = self.pipe.unet, self.conditioner
        seed = sample_seed(config.seed, f"lora/{sample.group}")
        unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the LoRA's initial weights
            unet.add_adapter(
                LoraConfig(r=lora.rank, lora_alpha=lora.rank, target_modules=list(LORA_TARGETS)), adapter_name=ADAPTER
            )
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lora.learning_rate)
        height, width = self.size(config)
        images = torch.cat(
            [
                self.pipe.image_processor.preprocess(im, height=height, width=width)
                for im in store.group(sample.references)
            ]
        )
        captions = list(sample.reference_captions) or [sample.caption] * len(images)
        unet.train()
        losses = []
        for step in range(lora.steps):
            generator = step_generator(seed, step, 0, 0)
            pick = torch.randint(0, len(images), (lora.batch_size,), generator=generator)
            latents = c.encode_latents(images[pick], generator)
            text, pooled = c.encode_text([captions[i] for i in pick.tolist()])
            noise = training_noise(latents.shape, lora.noise_offset, generator).to(latents.device, latents.dtype)
            timesteps = torch.randint(0, c.scheduler.config.num_train_timesteps, (len(pick),), generator=generator)
            timesteps = timesteps.to(latents.device)
            noisy = c.scheduler.add_noise(latents, noise, timesteps)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=text.dtype, device=text.device)
            added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pick), 1)}
            eps = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
            loss = F.mse_loss(eps.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        unet.eval()
        return losses

    def __call__(self, samples: Sequence[Sample], store: ImageStore, config: EvaluateConfig) -> list[Image.Image]:
        """Per group: tune, generate its samples, drop the LoRA. Images in the order of ``samples``."""
        from tqdm.auto import tqdm

        order: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            order.setdefault(sample.group, []).append(i)
        images: list[Image.Image | None] = [None] * len(samples)
        height, width = self.size(config)
        for group, indices in tqdm(order.items(), desc="per-group LoRA (tune + generate)", unit="group"):
            begin = time.perf_counter()
            self.tune(samples[indices[0]], store, config)
            self.tuning_seconds[group] = round(time.perf_counter() - begin, 3)
            try:
                for chunk in batches(indices, config.batch_size):
                    batch = [samples[i] for i in chunk]
                    out = self.pipe(
                        prompt=CaptionFit.shared(self.pipe)([s.caption for s in batch]),
                        negative_prompt=[config.negative_prompt] * len(batch),
                        num_inference_steps=config.steps,
                        guidance_scale=config.guidance,
                        height=height,
                        width=width,
                        generator=seeded_generators(batch),
                    ).images
                    for i, image in zip(chunk, out, strict=True):
                        images[i] = image
            finally:
                self.pipe.unet.delete_adapters(ADAPTER)
        return [im for im in images if im is not None]
