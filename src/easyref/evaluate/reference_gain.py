"""Reference gain (no generation): the denoising loss of each sample's target with its own references vs with the
references of a sample of another group, at the same timesteps and noise. Positive = the model uses the group."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from easyref.captions import CaptionFit

if TYPE_CHECKING:
    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.samples import ImageStore, Sample
    from easyref.sampler import EasyRefSampler


def partners(samples: Sequence[Sample]) -> list[int | None]:
    """For each sample, the index of the next sample (cyclically) from another group; None if there is none."""
    out: list[int | None] = []
    n = len(samples)
    for i, sample in enumerate(samples):
        out.append(next((j % n for j in range(i + 1, i + n) if samples[j % n].group != sample.group), None))
    return out


def reference_gain(
    sampler: EasyRefSampler, samples: Sequence[Sample], store: ImageStore, sdxl: str | Path, config: EvaluateConfig
) -> list[dict[str, float]]:
    """Per sample: denoising loss with its own references, with another group's, and the gain (other - own).

    Both losses use the same target latents (VAE posterior mean), caption, timesteps and noise; only the reference
    group differs. The MLLM reads the sample's own caption in both cases.
    """
    import torch
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    scheduler = DDPMScheduler.from_pretrained(sdxl, subfolder="scheduler")
    pipe, model, device = sampler.pipe, sampler.model, sampler.device
    factor = pipe.vae_scale_factor
    height = config.height or model.unet.config.sample_size * factor
    width = config.width or model.unet.config.sample_size * factor
    k = config.reference_gain.timesteps
    results: list[dict[str, float]] = []
    nan = float("nan")
    for sample, partner in tqdm(
        list(zip(samples, partners(samples), strict=True)), desc="reference gain", unit="sample"
    ):
        if partner is None:
            results.append({"loss_own": nan, "loss_other": nan, "reference_gain": nan})
            continue
        with torch.no_grad():
            target = pipe.image_processor.preprocess(store(sample.targets[0]), height=height, width=width)
            latents = pipe.vae.encode(target.to(device, pipe.vae.dtype)).latent_dist.mean
            latents = (latents * pipe.vae.config.scaling_factor).repeat(k, 1, 1, 1)
            text, _, pooled, _ = pipe.encode_prompt(
                prompt=CaptionFit.shared(pipe)([sample.caption]),
                device=device,
                num_images_per_prompt=k,
                do_classifier_free_guidance=False,
            )
            generator = torch.Generator().manual_seed(sample.seed)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (k,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            noisy = scheduler.add_noise(latents, noise, timesteps.to(device))
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=text.dtype).repeat(
                k, 1
            )
            groups = [store.group(sample.references), store.group(samples[partner].references)]
            states = sampler.encode_references(groups, [sample.caption] * 2)
            losses = []
            for s in states:
                eps = model(
                    noisy, timesteps.to(device), text, pooled, time_ids, s[None].expand(k, -1, -1).to(text.dtype)
                )
                losses.append(torch.nn.functional.mse_loss(eps.float(), noise.float()).item())
        results.append({"loss_own": losses[0], "loss_other": losses[1], "reference_gain": losses[1] - losses[0]})
    return results
