"""Generate images from a prompt and a group of reference images.

Example (tiny models, untrained EasyRef parts):

  easyref tiny-models --out models/tiny
  easyref generate --base models/tiny --ref a.png --ref b.png --ref c.png \\
      --prompt "a red star on a beach" --seed 0 --out outputs/star.png

With ``--checkpoint`` the trained EasyRef parts of a training stage are loaded on top of the base models.
Several images (``--num-images``) are written as ``NAME_0.png``, ``NAME_1.png``, ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from easyref.errors import UserError

HELP = "generate images from a prompt and a group of reference images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="folder holding the base models sdxl/ and mllm/")
    parser.add_argument("--checkpoint", type=Path, help="trained EasyRef checkpoint folder (default: untrained)")
    parser.add_argument(
        "--ref",
        action="append",
        type=Path,
        default=[],
        metavar="IMAGE",
        required=True,
        help="a reference image; repeat for a group",
    )
    parser.add_argument("--prompt", required=True, help="the text prompt (also read by the MLLM)")
    parser.add_argument("--negative-prompt", default="", help="text of the unconditional branch (default: empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps (default: 30)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight (default: 7.5)")
    parser.add_argument(
        "--scale", type=float, default=None, help="reference attention scale (default: the checkpoint's, 1.0)"
    )
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (default: 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("outputs/generated.png"), help="output PNG path")


def load_references(paths: list[Path]) -> list:
    """Open every reference image fully, with an error naming the file that cannot be used."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"reference image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"reference image {path} cannot be read as an image ({exc})") from exc
    return images


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    import torch

    from easyref.sampler import EasyRefSampler, base_paths
    from easyref.threads import configure_cpu_threads

    configure_cpu_threads(device=args.device)

    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    references = load_references(args.ref)
    sdxl, mllm = base_paths(args.base)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    sampler = EasyRefSampler.from_pretrained(sdxl, mllm, checkpoint=args.checkpoint, device=device, torch_dtype=dtype)
    images = sampler(
        [args.prompt],
        [references],
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        generator=args.seed,
        scale=args.scale,
    )
    paths = output_paths(args.out, len(images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        image.save(path)
        print(f"wrote {path}")
    return 0
