"""The training steps of the tiny SDXL base's pretraining (:mod:`easyref.tiny.base`): the VAE as an autoencoder,
its latents and calibrated ``scaling_factor``, and the UNet text-to-image on the frozen text encoders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from easyref.tiny.common import take_step, warmed_adamw

if TYPE_CHECKING:
    from easyref.tiny.base import BasePretrainConfig


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


def train_text_to_image(pipe: Any, means: Any, stds: Any, captions: list[list[str]], config: BasePretrainConfig,
                        generator: Any, steps: int, lr: float) -> list[float]:
    """The UNet on the frozen text encoders, epsilon MSE on the scaled latents (Min-SNR weighted per sample where
    ``config.snr_gamma`` > 0), ``steps`` steps warmed up to ``lr`` and decayed; returns the loss per step.

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
    opt, schedule = warmed_adamw(list(pipe.unet.parameters()), lr, config.warmup_steps, total=steps,
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
    for _ in bar:
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
    quiet.setLevel(level)
    pipe.unet.eval().requires_grad_(False)
    return losses
