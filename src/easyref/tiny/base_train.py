"""The settings and training steps of the tiny SDXL base's pretraining (:mod:`easyref.tiny.base`): the VAE as an
autoencoder, its latents and calibrated ``scaling_factor``, and the UNet text-to-image on the frozen text
encoders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from easyref.tiny.common import RunConfig
from easyref.tiny.optim import take_step, warmed_adamw


@dataclass(kw_only=True)
class BasePretrainConfig(RunConfig):
    """How the tiny base is pretrained (the defaults made the packaged one)."""

    data_seed: int = 1002  # the other parts' pretraining draws seed 1001, the demo 0
    per_subject: int = 4
    patterns: str = "all"
    resolution: int = 64
    """Training images are resized to this square side (the UNet's native size)."""
    vae_steps: int = 3000
    """Steps of the VAE's training. 6000 keep shapes and patterns (the judge names 0.85 of the reconstructions'
    shapes, as of the drawn images', against 0.77) and the base draws a few more shapes, but the demo's gate passed
    on one such base and failed on another of the same recipe, so the packaged base keeps 3000 (docs/training.md,
    "A 6000-step VAE")."""
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    """Weight of the KL term per latent element (Stable Diffusion's VAE used 1e-6)."""
    initial_logvar: float = -10.0
    """Initial log-variance of the VAE posterior (a nearly deterministic encoder from the first step)."""
    chroma_weight: float = 1.0
    """Weight of the colour (Cb, Cr) errors against the brightness (Y) error in the VAE's reconstruction loss; an
    autoencoder fits brightness first and colour last, so > 1 teaches it the colours sooner."""
    unet_steps: int = 5000
    unet_batch: int = 16
    unet_lr: float = 5e-4
    unet_restart_steps: int = 0
    unet_restart_lr: float = 2.5e-4
    """A second run of the UNet's training on the same data, with a fresh warm-up and cosine decay from this rate (a
    warm restart, as SGDR's). 4000 steps draw the named colour and shape more often (0.74 / 0.44 against 0.63 / 0.37
    at guidance 3), but the demo's EasyRef learned half the reference gain on that base and its DINO-I fell for
    every method, so the packaged base has none (0; docs/training.md, "A second UNet run")."""
    snr_gamma: float = 0.0
    """Min-SNR-gamma weighting of the UNet's loss (Hang et al. 2023; 0 = plain MSE, the packaged base's): the nearly
    clean timesteps stop dominating the gradient. With 5, on a 6000-step VAE, the base drew the named colour more
    often (0.97 against 0.94) and the shapes as often; EasyRef learned less on that one base, but one base per recipe
    cannot rank recipes: two plain-MSE bases of one recipe differed as much (docs/training.md)."""
    ema_decay: float = 0.999
    """Decay of an exponential moving average of the UNet's weights, which the base keeps instead of the last step's
    (as Stable Diffusion's and diffusers' ``--use_ema`` trainings do), warmed up as diffusers' is: the decay at step n
    is ``min(ema_decay, (1 + n) / (10 + n))``, so it reaches 0.999 only at step 8991 and over 5000 steps any value
    above 0.998 gives the warm-up's average, which weighs step n of N about as ``9 n^8 / N^9`` (nine tenths of it
    from the last quarter of the steps); 0 = the last step's weights (docs/training.md, "Averaged UNet weights")."""
    warmup_steps: int = 200
    final_lr: float = 0.1
    """Both trainings end on this share of their learning rate (cosine decay after the warm-up)."""
    drop_caption: float = 0.1
    """Share of empty captions, so the unconditional branch of guidance is learned too."""
    full_caption: float = 0.5
    """Share of captions that name colour, pattern and shape; the rest are the demo's, which leave some out."""
    noise_offset: float = 0.3
    """Offset noise: each latent channel's noise gets one more normal draw times this, shared by all its pixels.
    Without it an image's colours stay readable in the channel means of even the noisiest latents (signal-to-noise
    0.1-0.3 at the last timestep, about 1 at nine tenths), so the UNet learns to take them from there rather than
    from the caption, and from pure noise draws the colour the noise happens to suggest (docs/training.md)."""
    text_encoder: str = "clip"
    text_encoder_2: str = "ip_clip"
    """The packaged tiny CLIPs (:func:`easyref.tiny.assets.asset`) whose text towers become the two text encoders."""


def train_vae(vae: Any, images: Any, config: BasePretrainConfig, generator: Any) -> list[float]:
    """Autoencoder training with the reparameterised posterior sample; returns the loss per step.

    The loss is the RGB MSE plus ``chroma_weight - 1`` times the MSE of the colour-difference channels (Cb, Cr of
    ITU-R BT.601) and the small KL term.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    CHROMA = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])  # RGB -> (Cb, Cr)
    # Start the posterior nearly deterministic (log-variance -10): with the random init's log-variance of 0 the
    # sampling noise hides the colour in the latents and the decoder learns grey-blue averages instead.
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(config.initial_logvar)
    vae.train().requires_grad_(True)
    opt, schedule = warmed_adamw(list(vae.parameters()), config.vae_lr, 0, total=config.vae_steps,
                                 final=config.final_lr)
    losses = []
    bar = tqdm(range(config.vae_steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        batch = images[torch.randint(0, len(images), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(recon, batch) + config.kl_weight * kl
        if config.chroma_weight != 1.0:
            chroma = torch.einsum("ij,bjhw->bihw", CHROMA, recon - batch)
            loss = loss + (config.chroma_weight - 1.0) * chroma.pow(2).mean()
        take_step(loss, opt, schedule, losses, bar)
    vae.eval().requires_grad_(False)
    return losses


def encode_latents(vae: Any, images: Any, batch: int = 64) -> tuple[Any, Any]:
    """Posterior mean and std of ``images`` (unscaled)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            posterior = vae.encode(images[i : i + batch]).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def calibrate_scaling_factor(means: Any) -> float:
    """1 / std of the latents, as Stable Diffusion chose its factor (rounded to 5 significant digits)."""
    return float(f"{1.0 / float(means.std()):.5g}")


def min_snr_weight(alphas_cumprod: Any, gamma: float) -> Any:
    """Min-SNR-gamma loss weights of epsilon prediction (Hang et al. 2023): ``min(SNR, gamma) / SNR`` per sample,
    with SNR = alpha_bar / (1 - alpha_bar) of its timestep; 1 everywhere for ``gamma`` 0 (plain MSE). The nearly
    clean timesteps, whose noise is easy to tell and says nothing about an image's layout, stop dominating the
    gradient, so the UNet learns the shapes sooner."""
    if not gamma:
        return alphas_cumprod.new_ones(alphas_cumprod.shape)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def update_average(average: list[Any] | None, params: list[Any], decay: float, step: int) -> list[Any]:
    """One step of the exponential moving average of ``params`` after optimizer step ``step`` (1 for the first),
    with the warm-up ``min(decay, (1 + step) / (10 + step))``; the average starts at the first step's weights."""
    import torch

    if average is None:
        average = [p.detach().clone() for p in params]
    torch._foreach_lerp_(average, [p.detach() for p in params], 1 - min(decay, (1 + step) / (10 + step)))
    return average


def train_text_to_image(pipe: Any, means: Any, stds: Any, captions: list[list[str]], config: BasePretrainConfig,
                        generator: Any, steps: int, lr: float) -> list[float]:
    """The UNet on the frozen text encoders, epsilon MSE on the scaled latents (Min-SNR weighted per sample where
    ``config.snr_gamma`` > 0), ``steps`` steps warmed up to ``lr`` and decayed; returns the loss per step. With
    ``config.ema_decay`` the UNet ends on its weights' moving average.

    ``captions[i]`` are image i's captions: the first its own (the demo's style), the second, where there is one,
    its full caption, taken with probability ``full_caption``."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod
    pipe.unet.train().requires_grad_(True)
    params = list(pipe.unet.parameters())
    average = None
    opt, schedule = warmed_adamw(params, lr, config.warmup_steps, total=steps,
                                 final=config.final_lr)
    factor = pipe.vae.config.scaling_factor
    side = config.resolution
    # Captions past the encoders' 77 byte tokens are cut by the pipeline (the subject words come first, the
    # background last); its warning for every such batch would bury the progress bar.
    quiet = diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
    level = quiet.level
    quiet.setLevel(diffusers_logging.ERROR)
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(config.unet_batch, 1)
    losses = []
    bar = tqdm(range(steps), desc="unet", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(means), (config.unet_batch,), generator=generator)
        eps_z = torch.randn(means[idx].shape, generator=generator)
        latents = (means[idx] + stds[idx] * eps_z) * factor
        keep = torch.rand(config.unet_batch, generator=generator) >= config.drop_caption
        full = (torch.rand(config.unet_batch, generator=generator) < config.full_caption).long()
        prompts = [captions[i][min(f, len(captions[i]) - 1)] if k else ""
                   for i, k, f in zip(idx.tolist(), keep.tolist(), full.tolist(), strict=True)]
        with torch.no_grad():
            text, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=latents.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        noise = torch.randn(latents.shape, generator=generator)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        if config.snr_gamma:
            per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weight(alphas[t], config.snr_gamma)).mean()
        else:
            loss = F.mse_loss(pred, noise)
        take_step(loss, opt, schedule, losses, bar)
        if config.ema_decay:
            average = update_average(average, params, config.ema_decay, step + 1)
    quiet.setLevel(level)
    if average is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, average)
    pipe.unet.eval().requires_grad_(False)
    return losses
