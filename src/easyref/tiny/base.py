"""Pretrain the tiny profile's SDXL base offline: a VAE that reconstructs and a UNet that draws from text.

A real EasyRef starts from an SDXL that can already draw. The tiny profile's random SDXL cannot, so no adapter on
top of it can learn anything visible. ``easyref pretrain-base`` gives the tiny base what the real one has, with the
same diffusers classes and on-disk layout:

1. the VAE is trained as an autoencoder (reconstruction MSE plus a small KL term, sampling the posterior);
2. its ``scaling_factor`` is calibrated as Stable Diffusion's was: 1 / std of the latents of the training images,
   so scaled latents have unit variance and the diffusion schedule means what it says;
3. the two text encoders are pretrained CLIP text towers, frozen, as SDXL's are (OpenAI CLIP ViT-L/14's and
   OpenCLIP ViT-bigG/14's): the tiny judge CLIP's (``tiny_clip``) and the CLIP whose image tower is the
   IP-Adapter's encoder (``tiny_ip_clip``), both trained contrastively on demo-style images by
   :mod:`easyref.tiny.judges`; so the words of a caption reach the UNet already told apart by colour, shape and
   pattern;
4. the UNet alone is trained text-to-image (epsilon MSE, DDPM schedule, offset noise, 10% empty captions for
   classifier-free guidance, half the captions naming colour, pattern and shape) on those latents.

Both trainings end on a cosine decay of their learning rate. The data is demo-style images drawn by
:func:`easyref.tiny.data.draw` with another seed than the demo's: the base knows every colour, shape and pattern,
but has never seen an image of the demo's test sets. Everything is seeded and runs with a fixed number of threads,
so the same command gives the same bytes on the same kind of machine. The result is packaged with the library
(``easyref/assets/tiny_sdxl``) and ``easyref tiny-models`` starts from it; ``pretrain.json`` there records the
settings, the data and code it was made from, the checksum of every file and the base's check
(:mod:`easyref.tiny.base_check`: the VAE's error per colour, the share of text-to-image samples in the named colour
and shape), and ``preview.png`` shows it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from easyref.tiny.assets import asset as _asset
from easyref.tiny.assets import forget_source_path, publish
from easyref.tiny.base_train import (
    BasePretrainConfig,
    calibrate_scaling_factor,
    encode_latents,
    train_text_to_image,
    train_vae,
)
from easyref.tiny.build import SDXL_TRAINED as TRAINED
from easyref.tiny.common import add_config_arguments, config_from_args, last100, part_fingerprint

HELP = "pretrain the tiny SDXL base (VAE, then the UNet on frozen CLIP text towers) on demo data, offline"
ASSET = _asset("sdxl")


def load_text_towers(pipe: Any, config: BasePretrainConfig) -> dict[str, str]:
    """Put the text towers of the packaged tiny CLIPs into ``pipe`` as its two (frozen) text encoders; returns
    the sha256 of each CLIP they came from (its ``model.safetensors``)."""
    from transformers import CLIPModel

    from easyref.data.parquet import sha256_file
    from easyref.tiny.assets import asset

    sources = {}
    for name, part in (("text_encoder", config.text_encoder), ("text_encoder_2", config.text_encoder_2)):
        folder = asset(part)
        clip = CLIPModel.from_pretrained(folder)
        encoder = getattr(pipe, name)
        # CLIPModel names the tower `text_model.*` and its projection `text_projection.*`, as
        # CLIPTextModelWithProjection does; this transformers' CLIPTextModel names the tower's parts without the prefix
        wanted = set(encoder.state_dict())
        weights = {}
        for key, value in clip.state_dict().items():
            bare = key.removeprefix("text_model.")
            if key in wanted or bare in wanted:
                weights[key if key in wanted else bare] = value
        encoder.load_state_dict(weights, strict=True)
        encoder.eval().requires_grad_(False)
        sources[name] = f"tiny_{part} {sha256_file(folder / 'model.safetensors')}"
    return sources


def fingerprint() -> str:
    """sha256 of the code that shapes the pretrained base: this module, its settings and training steps
    (:mod:`easyref.tiny.base_train`) and what every part shares."""
    from easyref.tiny import base_train

    return part_fingerprint(__file__, base_train.__file__)


# -- data -------------------------------------------------------------------------------------------------------------


def to_tensor(images: list[Any], resolution: int) -> Any:
    """PIL images as one ``(N, 3, R, R)`` tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC), np.float32)
              for im in images]
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0).contiguous()


def load_pairs(folder: Path, resolution: int) -> tuple[Any, list[list[str]]]:
    """``(images, captions)`` of a folder in the demo-data layout (each image with its one caption)."""
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
    images = []
    for row in rows:
        with Image.open(folder / row["image"]) as im:
            images.append(im.convert("RGB"))
    return to_tensor(images, resolution), [[row["caption"]] for row in rows]


def draw_pairs(config: BasePretrainConfig) -> tuple[Any, list[list[str]]]:
    """``(images, captions)`` drawn for pretraining: each image with its demo caption and its full caption."""
    from easyref.tiny.data import draw

    drawn = draw(config.data_seed, config.per_subject, patterns=config.patterns)
    return to_tensor([d.image for d in drawn], config.resolution), [[d.caption, d.full_caption] for d in drawn]


RESTART = ("unet_restart_steps", "unet_restart_lr")


def load_first_run(pipe: Any, folder: Path, config: BasePretrainConfig, text_towers: dict[str, str]) -> dict:
    """Load the VAE and UNet of a base that ``pretrain-base`` wrote with ``config``'s settings and no second UNet
    run (``unet_restart_steps`` 0) into ``pipe``; returns its manifest. Every step is seeded, so the second run then
    gives the bytes of a run from scratch (tests/test_tiny_base.py)."""
    import torch
    from safetensors.torch import load_file

    from easyref.errors import UserError
    from easyref.tiny.assets import file_checksums, read_manifest

    manifest = read_manifest(folder)
    if file_checksums(folder) != manifest["files"]:
        raise UserError(f"{folder}: its files differ from their checksums in {folder / 'pretrain.json'}; "
                        "resume only from a base as pretrain-base wrote it")
    earlier = manifest["config"]
    if earlier.get("unet_restart_steps", 0):
        raise UserError(f"{folder}: that base already had its second UNet run; resume from one made with "
                        "--unet-restart-steps 0")
    differ = sorted(k for k, v in asdict(config).items() if k not in RESTART and earlier.get(k) != v)
    if manifest.get("text_encoders_from") != text_towers:
        differ.append("text encoders")
    if differ:
        raise UserError(f"{folder}: made with other settings ({', '.join(differ)}); resume only from a base made "
                        "with the same settings, or train from scratch without --resume-from")
    with torch.no_grad():
        for part in ("vae", "unet"):
            getattr(pipe, part).load_state_dict(load_file(folder / part / "diffusion_pytorch_model.safetensors"))
    pipe.vae.register_to_config(scaling_factor=manifest["scaling_factor"])
    pipe.vae.eval().requires_grad_(False)
    pipe.unet.eval().requires_grad_(False)
    return manifest


def pretrain_base(out: str | Path, config: BasePretrainConfig, data: str | Path | None = None,
                  resume: str | Path | None = None) -> dict[str, Any]:
    """Train the tiny SDXL base and write its trained parts to ``out``; returns the manifest. ``resume``: a base
    written with the same settings and ``unet_restart_steps`` 0, whose VAE and UNet stand for the first runs."""
    from easyref.quiet import quiet_pil_fallback

    quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
    import torch
    from diffusers import StableDiffusionXLPipeline

    from easyref.tiny import base_check
    from easyref.tiny.assets import PREVIEW
    from easyref.tiny.assets import asset as packaged
    from easyref.tiny.build import write_sdxl

    torch.set_num_threads(config.threads)
    out = Path(out)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sdxl = write_sdxl(Path(tmp) / "sdxl", seed=config.seed)
        if data is None:
            source = (f"easyref.tiny.data.draw(seed={config.data_seed}, per_subject={config.per_subject}, "
                      f"patterns={config.patterns!r})")
            images, captions = draw_pairs(config)
        else:
            source = Path(data).name
            images, captions = load_pairs(Path(data), config.resolution)
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
        text_towers = load_text_towers(pipe, config)
        generator = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)
        if resume is None:
            vae_losses = train_vae(pipe.vae, images, config, generator)
            means, stds = encode_latents(pipe.vae, images)
            pipe.vae.register_to_config(scaling_factor=calibrate_scaling_factor(means))
            unet_losses = train_text_to_image(pipe, means, stds, captions, config, generator, config.unet_steps,
                                              config.unet_lr)
            first = {"vae_loss_last100": last100(vae_losses), "unet_loss_last100": last100(unet_losses)}
            earlier_seconds = 0.0
        else:
            earlier = load_first_run(pipe, Path(resume), config, text_towers)
            means, stds = encode_latents(pipe.vae, images)
            first = {key: earlier[key] for key in ("vae_loss_last100", "unet_loss_last100")}
            earlier_seconds = earlier["seconds"]
            first["first_runs_resumed_from"] = {"unet": earlier["files"]["unet/diffusion_pytorch_model.safetensors"],
                                                "seconds": earlier_seconds}
        if config.unet_restart_steps:
            # its own seed, so that resuming from a first run's files gives the same bytes as one run from scratch
            torch.manual_seed(config.seed + 1)
            restart = train_text_to_image(pipe, means, stds, captions, config,
                                          torch.Generator().manual_seed(config.seed + 1),
                                          config.unet_restart_steps, config.unet_restart_lr)
            first["unet_restart_loss_last100"] = last100(restart)
        trained = Path(tmp) / "base"  # the whole pipeline, for the check and the preview
        pipe.save_pretrained(trained)
        staged = Path(tmp) / "trained"
        for part in TRAINED:
            getattr(pipe, part).save_pretrained(staged / part)
            forget_source_path(staged / part / "config.json")
        checked = base_check.check(trained, packaged("clip"))
        base_check.write_preview(trained, staged / PREVIEW)
        manifest = {
            "config": asdict(config),
            "code_sha256": fingerprint(),
            "data": source,
            "images": len(captions),
            "text_encoders_from": text_towers,
            "scaling_factor": pipe.vae.config.scaling_factor,
            **first,
            "seconds": round(time.time() - started + earlier_seconds, 1),  # the first runs' included
            "torch": torch.__version__,
            "check": {k: v for k, v in checked.items() if k != "images"},
        }
        return publish(staged, out, manifest)


# -- command line -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, BasePretrainConfig)  # --out, --patterns and one flag per number setting
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder in the demo-data layout (default: demo data drawn with --data-seed)")
    parser.add_argument("--resume-from", type=Path, default=None,
                        help="a base written by pretrain-base with these settings and --unet-restart-steps 0: keep its "
                             "VAE and UNet and run only the UNet's second run (the same bytes as from scratch)")


def run(args: argparse.Namespace) -> int:
    minimum = {"vae_steps": 1, "vae_batch": 1, "unet_steps": 1, "unet_batch": 1, "unet_restart_steps": 0}
    config = config_from_args(BasePretrainConfig(), args, minimum)
    out = args.out or ASSET
    manifest = pretrain_base(out, config, args.data, args.resume_from)
    print(f"pretrain-base: wrote {out} in {manifest['seconds']} s (scaling_factor "
          f"{manifest['scaling_factor']}, final losses vae {manifest['vae_loss_last100']:.4f}, "
          f"unet {manifest.get('unet_restart_loss_last100', manifest['unet_loss_last100']):.4f}); check {manifest['check']}")
    return 0
