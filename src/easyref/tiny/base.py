"""Pretrain the tiny profile's SDXL base offline: a VAE that reconstructs and a UNet that draws from text.

A real EasyRef starts from an SDXL that can already draw. The tiny profile's random SDXL cannot, so no adapter on
top of it can learn anything visible. ``easyref pretrain-base`` gives the tiny base what the real one has, with the
same diffusers classes and on-disk layout:

1. the VAE is trained as an autoencoder (reconstruction MSE plus a small KL term, sampling the posterior);
2. its ``scaling_factor`` is calibrated as Stable Diffusion's was: 1 / std of the latents of the training images,
   so scaled latents have unit variance and the diffusion schedule means what it says;
3. the UNet and both CLIP text encoders are trained text-to-image (epsilon MSE, DDPM schedule, 10% empty
   captions for classifier-free guidance) on those latents.

The data is the demo dataset drawn with another seed (:attr:`BasePretrainConfig.data_seed`) than the one the demo
trains and evaluates EasyRef on: the base knows every colour, shape and pattern, but has never seen an image of the
demo's test sets. Everything is seeded and runs with a fixed number of threads, so the same command gives the
same bytes on the same kind of machine. The result is packaged with the library (``easyref/assets/tiny_sdxl``) and
``easyref tiny-models`` starts from it; ``pretrain.json`` there records the settings, the data and code it was made
from, and the checksum of every file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from easyref.tiny.assets import asset as _asset
from easyref.tiny.assets import code_fingerprint, forget_source_path, publish
from easyref.tiny.build import SDXL_TRAINED as TRAINED

HELP = "pretrain the tiny SDXL base (VAE, then UNet + text encoders) on demo data, offline"
ASSET = _asset("sdxl")


@dataclass(kw_only=True)
class BasePretrainConfig:
    """How the tiny base is pretrained (the defaults made the packaged one)."""

    seed: int = 0
    """Seed of the random tiny models the training starts from and of the training's own randomness."""
    data_seed: int = 1
    """Seed of the demo data drawn for base pretraining (the demo itself uses seed 0)."""
    resolution: int = 64
    """Training images are resized to this square side (the UNet's native size)."""
    vae_steps: int = 800
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    """Weight of the KL term per latent element (Stable Diffusion's VAE used 1e-6)."""
    initial_logvar: float = -10.0
    """Initial log-variance of the VAE posterior (a nearly deterministic encoder from the first step)."""
    chroma_weight: float = 1.0
    """Weight of the colour (Cb, Cr) errors against the brightness (Y) error in the VAE's reconstruction loss; an
    autoencoder fits brightness first and colour last, so > 1 teaches it the colours sooner."""
    unet_steps: int = 2500
    unet_batch: int = 16
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    drop_caption: float = 0.1
    """Share of empty captions, so the unconditional branch of guidance is learned too."""
    threads: int = 1
    """torch threads; fixed, so that the result is reproducible."""


def base_fingerprint() -> str:
    """sha256 of the code that shapes the pretrained base: this module, the tiny models and the demo data."""
    from easyref.data import demo
    from easyref.tiny import build

    return code_fingerprint([build.__file__, demo.__file__, __file__])


# -- data -------------------------------------------------------------------------------------------------------------


def load_pairs(folder: Path, resolution: int) -> tuple[Any, list[str], list[str]]:
    """``(images (N, 3, R, R) in [-1, 1], captions, image paths)`` of a folder in the demo-data layout."""
    import numpy as np
    import torch
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
    arrays = []
    for row in rows:
        with Image.open(folder / row["image"]) as im:
            small = im.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(small, dtype=np.float32))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images.contiguous(), [row["caption"] for row in rows], [row["image"] for row in rows]


# -- training ---------------------------------------------------------------------------------------------------------


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
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
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


def train_text_to_image(pipe: Any, means: Any, stds: Any, captions: list[str], config: BasePretrainConfig,
                        generator: Any) -> list[float]:
    """UNet + both text encoders, epsilon MSE on the scaled latents; returns the loss per step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    modules = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    factor = pipe.vae.config.scaling_factor
    side = config.resolution
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(config.unet_batch, 1)
    losses = []
    bar = tqdm(range(config.unet_steps), desc="unet", dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(0, len(means), (config.unet_batch,), generator=generator)
        eps_z = torch.randn(means[idx].shape, generator=generator)
        latents = (means[idx] + stds[idx] * eps_z) * factor
        keep = torch.rand(config.unet_batch, generator=generator) >= config.drop_caption
        prompts = [captions[i] if k else "" for i, k in zip(idx.tolist(), keep.tolist(), strict=True)]
        text, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=latents.device, num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    for m in modules:
        m.eval().requires_grad_(False)
    return losses


def pretrain_base(out: str | Path, config: BasePretrainConfig, data: str | Path | None = None) -> dict[str, Any]:
    """Train the tiny SDXL base and write its trained parts to ``out``; returns the manifest."""
    from easyref.quiet import quiet_pil_fallback

    quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
    import torch
    from diffusers import StableDiffusionXLPipeline

    from easyref.data.demo import write_demo_data
    from easyref.tiny.build import write_sdxl

    torch.set_num_threads(config.threads)
    out = Path(out)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sdxl = write_sdxl(Path(tmp) / "sdxl", seed=config.seed)
        source = f"demo-data --seed {config.data_seed}" if data is None else Path(data).name
        if data is None:
            data = Path(tmp) / "data"
            write_demo_data(data, seed=config.data_seed)
        images, captions, _ = load_pairs(Path(data), config.resolution)
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        vae_losses = train_vae(pipe.vae, images, config, generator)
        means, stds = encode_latents(pipe.vae, images)
        pipe.vae.register_to_config(scaling_factor=calibrate_scaling_factor(means))
        unet_losses = train_text_to_image(pipe, means, stds, captions, config, generator)
        staged = Path(tmp) / "trained"
        for part in TRAINED:
            getattr(pipe, part).save_pretrained(staged / part)
            forget_source_path(staged / part / "config.json")
        manifest = {
            "config": asdict(config),
            "code_sha256": base_fingerprint(),
            "data": source,
            "images": len(captions),
            "scaling_factor": pipe.vae.config.scaling_factor,
            "vae_loss_last100": sum(vae_losses[-100:]) / len(vae_losses[-100:]),
            "unet_loss_last100": sum(unet_losses[-100:]) / len(unet_losses[-100:]),
            "seconds": round(time.time() - started, 1),
            "torch": torch.__version__,
        }
        return publish(staged, out, manifest)


PREVIEW_CAPTIONS = (
    "a large red circle in the centre on a white background",
    "a large blue square in the centre on a white background",
    "a large green triangle in the centre on a cream background",
    "a large yellow star in the centre on a light grey background",
    "a large striped purple hexagon in the centre on a white background",
    "a large orange cross in the centre on a pale blue background",
    "a large checkered teal circle in the centre on a white background",
    "a large polka-dot brown square in the centre on a white background",
)


def write_preview(sdxl: Path, data: Path, png: Path, resolution: int = 64, seed: int = 0) -> None:
    """A picture of what the base can do: demo images, their VAE reconstructions, text-to-image samples.

    Rows: 8 demo images (one per colour), their reconstructions, then two seeds of 30-step DDIM samples (guidance
    7.5) for :data:`PREVIEW_CAPTIONS`, whose captions are written under the grid.
    """
    from easyref.quiet import quiet_pil_fallback

    quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from PIL import Image, ImageDraw

    from easyref.data.demo import COLOURS

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images, _, names = load_pairs(data, resolution)
    picks = [next(i for i, n in enumerate(names) if colour in n.split("/")[0].split("-")) for colour in COLOURS]
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(images[picks]).latent_dist.mean).sample
    rows = [pipe.image_processor.postprocess(batch) for batch in (images[picks], recon)]
    for s in (seed, seed + 1):
        rows.append(pipe(list(PREVIEW_CAPTIONS), num_inference_steps=30, guidance_scale=7.5, height=resolution,
                         width=resolution, generator=torch.Generator().manual_seed(s)).images)
    cell, label = resolution * 2, 14
    labels = ["demo images", "VAE reconstructions", "text to image, seed 0", "text to image, seed 1"]
    canvas = Image.new("RGB", (8 * cell, len(rows) * (cell + label) + 8 * 12 + 6), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, text) in enumerate(zip(rows, labels, strict=True)):
        y = r * (cell + label)
        draw.text((2, y + 1), text, fill="black")
        for c, im in enumerate(row):
            canvas.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y + label))
    y = len(rows) * (cell + label) + 4
    for i, caption in enumerate(PREVIEW_CAPTIONS):
        draw.text((2, y + 12 * i), f"column {i + 1}: {caption}", fill="black")
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)


# -- command line -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=ASSET,
                        help="where to write the trained vae/, unet/, text_encoder*/ (default: the packaged asset)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder in the demo-data layout (default: demo data drawn with --data-seed)")
    defaults = BasePretrainConfig()
    for name in ("seed", "data_seed", "vae_steps", "unet_steps", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"(default {getattr(defaults, name)})")
    for name in ("vae_lr", "chroma_weight"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            help=f"(default {getattr(defaults, name)})")


def run(args: argparse.Namespace) -> int:
    from easyref.errors import UserError

    for name in ("vae_steps", "unet_steps", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = BasePretrainConfig(seed=args.seed, data_seed=args.data_seed, vae_steps=args.vae_steps,
                                unet_steps=args.unet_steps, threads=args.threads, vae_lr=args.vae_lr,
                                chroma_weight=args.chroma_weight)
    manifest = pretrain_base(args.out, config, args.data)
    print(f"pretrain-base: wrote {args.out} in {manifest['seconds']} s (scaling_factor "
          f"{manifest['scaling_factor']}, final losses vae {manifest['vae_loss_last100']:.4f}, "
          f"unet {manifest['unet_loss_last100']:.4f})")
    return 0
