"""Pretrain the tiny IP-Adapter-SDXL baseline on the tiny base, the way IP-Adapter was trained.

The paper compares EasyRef with IP-Adapter-SDXL, a trained adapter: a CLIP image encoder (OpenCLIP ViT-bigG, not the
CLIP that judges), an image projection to 4 tokens, and decoupled cross-attention whose ``to_k_ip`` / ``to_v_ip``
start as copies of each layer's ``to_k`` / ``to_v``. Only the projection and those weights train; base and encoder
stay frozen. The objective is the base's and EasyRef's (epsilon MSE, DDPM schedule, offset noise), conditioned on
the CLIP embedding of the training image itself, with the image, the caption or both dropped 5% of the time each
(IP-Adapter's recipe) so guidance works. At evaluation the multi-reference baseline feeds the mean embedding of the
group's references.

The image encoder is the vision tower of the ``ip_clip`` judge (:mod:`easyref.tiny.judges`: a CLIP trained on other
seeds than the CLIP that scores). The data is demo-style images drawn with other seeds than the demo's, with the
demo's captions (colour or pattern sometimes left out). The result is laid out as the ``h94/IP-Adapter``
repository, so diffusers' ``load_ip_adapter`` reads it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref.tiny import assets
from easyref.tiny.common import PretrainConfig, add_config_arguments, config_from_args, part_fingerprint, run_record
from easyref.tiny.optim import take_step

SUBFOLDER = "sdxl_models"
WEIGHTS = "ip-adapter_sdxl.safetensors"


@dataclass(kw_only=True)
class IPAdapterPretrainConfig(PretrainConfig):
    """How the tiny IP-Adapter is trained (the defaults made the packaged one)."""

    data_seed: int = 4001
    per_subject: int = 8
    patterns: str = "all"
    """The subjects of the demo's groups (``data.demo_patterns``), so that both adapters learn from the same kinds
    of groups (8 x 192 images)."""
    steps: int = 500
    """500 steps of 16 = 8,000 samples: the budget of EasyRef's stage 1 in the demo (2000 steps of 4), so the two
    adapters are compared at equal training (the paper's IP-Adapter-SDXL is its authors' long-trained release)."""
    batch: int = 16
    lr: float = 5e-4
    drop: float = 0.05
    """Probability of each of: image dropped, caption dropped, both dropped."""
    resolution: int = 64
    """Side the training images are resized to (the tiny UNet's native size)."""
    noise_offset: float = 0.3
    """Offset noise, as the tiny base's UNet was trained and EasyRef trains on it (``train.noise_offset``)."""


def image_encoder(ip_clip: Path, out: Path) -> None:
    """The vision tower and projection of a trained CLIP as a ``CLIPVisionModelWithProjection`` folder."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    clip = CLIPModel.from_pretrained(ip_clip)
    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    vision.load_state_dict(state)
    vision.save_pretrained(out)
    assets.forget_source_path(out / "config.json")
    for name in ("preprocessor_config.json",):
        shutil.copy(ip_clip / name, out / name)


def initial_state(unet: Any, embed_dim: int, generator: Any) -> dict[str, dict[str, Any]]:
    """IP-Adapter's starting point: a small random projection to 4 tokens, ``to_{k,v}_ip`` = ``to_{k,v}``."""
    import torch

    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross, embed_dim, generator=generator) * embed_dim**-0.5,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    for key_id, attn in _cross_attentions(unet):
        for proj in ("to_k", "to_v"):
            ip_adapter[f"{key_id}.{proj}_ip.weight"] = getattr(attn, proj).weight.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _cross_attentions(unet: Any) -> list[tuple[int, Any]]:
    """``(key id, attention module)`` of every ``attn2``, numbered as diffusers numbers IP-Adapter weights."""
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [(1 + 2 * i, unet.get_submodule(n.removesuffix(".processor"))) for i, n in enumerate(names)]


def trained_state(unet: Any) -> dict[str, Any]:
    """The adapter's weights in the flat ``image_proj.*`` / ``ip_adapter.*`` layout of ``ip-adapter_sdxl``."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]  # diffusers' ImageProjection: image_embeds, norm
    tensors = {f"image_proj.{k.replace('image_embeds.', 'proj.')}": v for k, v in proj.state_dict().items()}
    for key_id, attn in _cross_attentions(unet):
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = attn.processor.to_k_ip[0].weight
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = attn.processor.to_v_ip[0].weight
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def train_ip_adapter(sdxl: Path, encoder: Path, config: IPAdapterPretrainConfig) -> tuple[dict[str, Any], list[float]]:
    """Train the adapter on the tiny base ``sdxl``; returns its weights and the loss per step."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from tqdm.auto import tqdm
    from transformers import CLIPVisionModelWithProjection

    from easyref.captions import CaptionFit
    from easyref.metrics import _load_image_processor
    from easyref.tiny.data import draw
    from easyref.train.recipe import training_noise

    drawn = draw(config.data_seed, config.per_subject, patterns=config.patterns)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    vision = CLIPVisionModelWithProjection.from_pretrained(encoder).eval()
    side = config.resolution
    with torch.no_grad():
        embeds = vision(_load_image_processor(str(encoder))(images=[d.image for d in drawn],
                                                             return_tensors="pt")["pixel_values"]).image_embeds
        pixels = torch.from_numpy(np.stack([np.asarray(d.image.convert("RGB").resize((side, side))) for d in drawn]))
        pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        posterior = pipe.vae.encode(pixels).latent_dist
        captions = sorted({d.caption for d in drawn} | {""})
        fitted = CaptionFit.for_pipeline(pipe)(captions)  # cut to 77 tokens as every caller of the pipeline does
        text, _, pooled, _ = pipe.encode_prompt(prompt=fitted, device="cpu", do_classifier_free_guidance=False)
    caption_index = {c: i for i, c in enumerate(captions)}
    generator = torch.Generator().manual_seed(config.seed)
    unet = pipe.unet
    unet._load_ip_adapter_weights(initial_state(unet, embeds.shape[-1], generator))
    unet.requires_grad_(False)
    params = list(unet.encoder_hid_proj.parameters())
    params += [p for _, attn in _cross_attentions(unet) for p in attn.processor.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    factor = pipe.vae.config.scaling_factor
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(config.batch, 1)
    losses = []
    for _ in (bar := tqdm(range(config.steps), desc="ip-adapter", dynamic_ncols=True)):
        idx = torch.randint(0, len(drawn), (config.batch,), generator=generator)
        latents = (posterior.mean[idx] + posterior.std[idx] * torch.randn(posterior.mean[idx].shape,
                                                                          generator=generator)) * factor
        draw_kind = torch.rand(config.batch, generator=generator)  # < drop: image, < 2 drop: caption, < 3 drop: both
        no_image = (draw_kind < config.drop) | ((draw_kind >= 2 * config.drop) & (draw_kind < 3 * config.drop))
        no_text = (draw_kind >= config.drop) & (draw_kind < 3 * config.drop)
        rows = [caption_index["" if t else drawn[i].caption] for i, t in zip(idx.tolist(), no_text.tolist(), strict=True)]
        image = torch.where(no_image[:, None], torch.zeros_like(embeds[idx]), embeds[idx])
        noise = training_noise(latents.shape, config.noise_offset, generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch,), generator=generator)
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text[rows],
                    added_cond_kwargs={"text_embeds": pooled[rows], "time_ids": time_ids,
                                       "image_embeds": [image[:, None]]}).sample
        loss = F.mse_loss(pred, noise)
        take_step(loss, opt, None, losses, bar)
    return trained_state(unet), losses


def pretrain_ip_adapter(out: Path, config: IPAdapterPretrainConfig) -> dict[str, Any]:
    """Train the adapter on the packaged tiny base with the packaged ``ip_clip`` encoder; publish it to ``out``."""
    import torch
    from safetensors.torch import save_file

    from easyref.tiny import build

    torch.set_num_threads(config.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ip_adapter" / SUBFOLDER
        image_encoder(assets.asset("ip_clip"), folder / "image_encoder")
        sdxl = build.write_sdxl(Path(tmp) / "sdxl", seed=config.seed)
        assets.install(assets.asset("sdxl"), sdxl, build.SDXL_TRAINED)
        tensors, losses = train_ip_adapter(sdxl, folder / "image_encoder", config)
        save_file(tensors, folder / WEIGHTS)
        base = assets.read_manifest(assets.asset("sdxl"))
        record = run_record("ip_adapter", config, fingerprint(), losses, started,
                            base_unet_sha256=base["files"]["unet/diffusion_pytorch_model.safetensors"],
                            image_encoder_from="tiny_ip_clip")
        return assets.publish(folder.parent, out, record)


def fingerprint() -> str:
    """sha256 of the code that shapes the IP-Adapter: this module and what every part shares (the base it trains on
    is recorded by its hash)."""
    return part_fingerprint(__file__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, IPAdapterPretrainConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(IPAdapterPretrainConfig(), args)
    out = args.out or assets.asset("ip_adapter")
    manifest = pretrain_ip_adapter(out, config)
    print(f"pretrain-tiny ip_adapter: wrote {out} in {manifest['seconds']} s (loss {manifest['loss_last100']:.4f})")
    return 0
