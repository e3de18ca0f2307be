"""Reference gain (no generation): the denoising loss of each sample's target with its own references vs with the
references of a sample of another group, at the same timesteps and noise. Positive = the model uses the group.

The gain is also given per quarter of the noise schedule (:func:`band_columns`), as a share of the loss with the
own references: at high noise (the last quarter) an image's colours and layout are decided, at low noise (the first)
its edges and texture. A model whose references help at low noise only uses them for detail, and draws the colour
that the caption and the seed give.
"""

from __future__ import annotations

from collections.abc import Sequence
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


NOISE_BANDS = 4
"""The reference gain is also reported per this many equal ranges of the training timesteps."""
BAND_PREFIX = "reference_gain_share_t"


def band_columns(num_train_timesteps: int) -> list[tuple[str, int, int]]:
    """``(column, first, last)`` of each noise band, e.g. ``("reference_gain_share_t750_999", 750, 999)``."""
    edges = [round(i * num_train_timesteps / NOISE_BANDS) for i in range(NOISE_BANDS + 1)]
    return [(f"{BAND_PREFIX}{lo}_{hi - 1}", lo, hi - 1) for lo, hi in zip(edges, edges[1:], strict=False)]


def per_band(own: list[float], other: list[float], timesteps: list[int], num_train_timesteps: int) -> dict[str, float]:
    """Per noise band, the gain as a share of the loss with the own references, over the draws whose timestep lies
    in it: ``(sum other - sum own) / sum own`` (NaN for a band no draw fell in). A share, not the loss difference:
    the epsilon loss is an order of magnitude smaller at high noise than at low (the tiny base: 0.007 against 0.09),
    so differences of different bands do not compare, while shares do (per draw a share is also the same in the
    image's units, where the loss is the epsilon loss / SNR)."""
    out = {}
    for column, lo, hi in band_columns(num_train_timesteps):
        inside = [i for i, t in enumerate(timesteps) if lo <= t <= hi]
        mine = sum(own[i] for i in inside)
        out[column] = (sum(other[i] for i in inside) - mine) / mine if inside and mine > 0 else float("nan")
    return out


def reference_gain(
    sampler: EasyRefSampler, samples: Sequence[Sample], store: ImageStore, config: EvaluateConfig
) -> list[dict[str, float]]:
    """Per sample: denoising loss with its own references, with another group's, the gain (other - own), and the
    gain per noise band (:func:`band_columns`).

    Both losses use the same target latents (VAE posterior mean), caption, timesteps and noise; only the reference
    group differs. The MLLM reads the sample's own caption in both cases.
    """
    import torch
    from tqdm.auto import tqdm

    scheduler = sampler.base.noise_scheduler
    pipe, model, device = sampler.pipe, sampler.model, sampler.device
    factor = pipe.vae_scale_factor
    height = config.height or model.unet.config.sample_size * factor
    width = config.width or model.unet.config.sample_size * factor
    k = config.reference_gain.timesteps
    results: list[dict[str, float]] = []
    nan = float("nan")
    num_train_timesteps = scheduler.config.num_train_timesteps
    no_bands = {column: nan for column, _, _ in band_columns(num_train_timesteps)}
    for sample, partner in tqdm(
        list(zip(samples, partners(samples), strict=True)), desc="reference gain", unit="sample"
    ):
        if partner is None:
            results.append({"loss_own": nan, "loss_other": nan, "reference_gain": nan, **no_bands})
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
            timesteps = torch.randint(0, num_train_timesteps, (k,), generator=generator)
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
                losses.append(((eps.float() - noise.float()) ** 2).mean(dim=(1, 2, 3)))  # one loss per draw
        own, other = losses[0].mean().item(), losses[1].mean().item()
        bands = per_band(losses[0].tolist(), losses[1].tolist(), timesteps.tolist(), num_train_timesteps)
        results.append({"loss_own": own, "loss_other": other, "reference_gain": other - own, **bands})
    return results
