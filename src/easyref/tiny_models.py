"""Write small, randomly initialised models in the hub repositories' on-disk layout.

The tree written under ``--out`` mirrors what the real profile downloads, so the library loads both with the same
``from_pretrained`` calls:

  sdxl/   a diffusers Stable Diffusion XL folder (model_index.json, unet, vae, text_encoder[_2], tokenizer[_2],
          scheduler), loadable by ``StableDiffusionXLPipeline.from_pretrained``
  mllm/   a Qwen2-VL model with tokenizer, chat template and image-processor files
  clip/   a CLIP model (text and vision towers) with its processor files
  dino/   a DINOv2 model with its image-processor file
  ip_adapter/sdxl_models/   IP-Adapter-SDXL weights for the tiny SDXL (``ip-adapter_sdxl.safetensors``) and its CLIP
          image encoder (``image_encoder/``), laid out as the ``h94/IP-Adapter`` repository, loadable by
          ``pipe.load_ip_adapter(path, subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")``

The random models come from :mod:`easyref.tiny.build`; with the pretrained parts (the default) the packaged ones of
:mod:`easyref.tiny` are installed over them. The same seed gives byte-identical folders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from easyref.tiny import assets, build

HELP = "write the tiny SDXL / Qwen2-VL / CLIP / DINOv2 / IP-Adapter models (pretrained parts installed)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("models/tiny"), help="output folder (default: models/tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default: 0)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the folder holds a finished tree written with these settings and the "
                             "packaged parts of this checkout (one written before a part was re-made is rebuilt "
                             "anyway)")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="keep every model random instead of installing the packaged pretrained tiny parts",
    )


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    pretrained = not args.untrained
    if not args.force:
        stale = stale_settings(out, stamp(args.seed, 1, pretrained))
        if not stale:
            print(f"tiny models already present in {out} (use --force to rebuild)")
            return 0
        if (out / STAMP).is_file():
            print(f"{out} was written with other {', '.join(stale)}: rebuilding it")
    write_tiny_models(out, seed=args.seed, pretrained=pretrained)
    print(f"wrote tiny models to {out}: {', '.join(sorted(p.name for p in out.iterdir() if p.is_dir()))}")
    return 0


STAMP = ".complete"
"""Written last into a finished tree: the settings and the packaged parts it was written with."""


def stamp(seed: int, width: int, pretrained: bool) -> dict[str, object]:
    """What a tree written with these settings records: them, and with ``pretrained`` the sha256 of each
    packaged part's manifest (a re-made part makes an older tree stale)."""
    from easyref.data.parquet import sha256_file

    parts = ("sdxl", *PRETRAINED) if pretrained and width == 1 else ()
    packaged = {part: sha256_file(assets.asset(part) / assets.MANIFEST) for part in parts}
    return {"seed": seed, "width": width, "pretrained": bool(parts), "packaged": packaged}


def stale_settings(out: Path, expected: dict[str, object]) -> list[str]:
    """The settings (``seed``, ``packaged`` parts, ...) in which the finished tree at ``out`` differs from
    ``expected``; every one of them when ``out`` holds no finished tree."""
    try:
        written = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return list(expected)
    stale = [key for key in expected if key != "packaged" and written.get(key) != expected[key]]
    old = written.get("packaged") if isinstance(written.get("packaged"), dict) else {}
    stale += [f"packaged {part}" for part, digest in expected["packaged"].items() if old.get(part) != digest]
    return stale


PRETRAINED = ("mllm", "clip", "dino", "ip_adapter")
"""Model folders replaced whole by the packaged part of the same name (``easyref pretrain-tiny PART``)."""


def write_tiny_models(out: str | Path, seed: int = 0, width: int = 1, pretrained: bool = True) -> Path:
    """Build all tiny models under ``out`` (replacing what is there) and return ``out``.

    ``width`` multiplies the UNet's channels and the MLLM's hidden size (benchmarks use a wider "small" tree).
    With ``pretrained`` (width 1 only) every part that the real profile downloads pretrained is the packaged
    pretrained tiny one (:mod:`easyref.tiny`): the SDXL base, the MLLM, the CLIP and DINOv2 judges and the
    IP-Adapter baseline. Without it every weight is random (seeded).
    """
    import torch

    from easyref.atomic import atomic_folder

    out = Path(out)
    pretrained = pretrained and width == 1
    with atomic_folder(out) as writer:  # the folder appears whole or not at all
        tmp = writer.path
        torch.manual_seed(seed)
        build.write_sdxl(tmp / "sdxl", seed, width)
        build.write_qwen2vl(tmp / "mllm", seed, width)
        build.write_clip(tmp / "clip", seed)
        build.write_dino(tmp / "dino", seed)
        build.write_ip_adapter(tmp / "ip_adapter", seed)
        if pretrained:
            assets.install(assets.asset("sdxl"), tmp / "sdxl", build.SDXL_TRAINED)
            for part in PRETRAINED:
                assets.install(assets.asset(part), tmp / part)
        writer.write_text(STAMP, json.dumps(stamp(seed, width, pretrained)) + "\n")
    return out

