"""Generate images from a prompt and a group of reference images.

Example (tiny models, untrained EasyRef parts):

  easyref tiny-models --out models/tiny
  easyref generate --base models/tiny --ref a.png --ref b.png --ref c.png \\
      --prompt "a red star on a beach" --seed 0 --out outputs/star.png

With ``--checkpoint`` the trained EasyRef parts of a training stage are loaded on top of the base models. Without
it they are untrained: initialised from ``--seed`` (the same command and seed give the same image) and announced
with a warning. Several images (``--num-images``) are written as ``NAME_0.png``, ``NAME_1.png``, ...

``--scale 0`` is text-only SDXL: the reference branch is skipped, the MLLM does not run and ``--ref`` may be left
out. ``--fuse-qkv``, ``--channels-last``, ``--compile``, ``--vae-slicing`` and ``--vae-tiling`` are opt-in speed and
memory options (:mod:`easyref.sampler_speed`; their measured effect is in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from easyref.captions import MAX_PROMPT_CHARS
from easyref.errors import UserError

HELP = "generate images from a prompt and a group of reference images"
MAX_SIDE = 4096
"""Largest --height/--width (SDXL is trained at 1024; beyond this a request only exhausts memory)."""
MAX_IMAGES = 64
"""Most images per call (--num-images)."""
MAX_REFERENCE_PIXELS = 8192 * 8192
"""Largest reference image area; checked from the header, before decoding (decompression bombs)."""
MAX_ASPECT = 200
"""Largest reference aspect ratio the Qwen2-VL image processor accepts."""
UNTRAINED_WARNING = (
    "warning: no --checkpoint: the EasyRef parts (reference tokens, MLLM head, projector, reference attention) are "
    "UNTRAINED random weights, initialised from --seed {seed}; the image shows what an untrained model does, not "
    "EasyRef. Pass --checkpoint RUN/final of a training stage."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="folder holding the base models sdxl/ and mllm/")
    parser.add_argument("--checkpoint", type=Path, help="trained EasyRef checkpoint folder (default: untrained)")
    parser.add_argument(
        "--ref",
        action="append",
        type=Path,
        default=[],
        metavar="IMAGE",
        help="a reference image; repeat for a group (none with --scale 0: text-only SDXL, the MLLM does not run)",
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
    speed = parser.add_argument_group("speed and memory (opt-in; measured in docs/performance.md)")
    speed.add_argument("--fuse-qkv", action="store_true", help="one q/k/v matmul per UNet self-attention")
    speed.add_argument("--channels-last", action="store_true", help="UNet convolutions in channels_last layout")
    speed.add_argument("--compile", action="store_true", help="torch.compile the UNet (the first image compiles)")
    speed.add_argument("--vae-slicing", action="store_true", help="decode one image at a time (less memory)")
    speed.add_argument(
        "--vae-tiling", action="store_true", help="decode large images in blended tiles (less memory; seams blended)"
    )


def load_references(paths: list[Path]) -> list:
    """Open every reference image fully, with an error naming the file that cannot be used.

    The size is checked from the header before any pixel is decoded, so a small file that claims a huge image (a
    decompression bomb) is refused without allocating it.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"reference image {path} does not exist")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    _check_reference_size(path, *im.size)
                    im.load()
                    images.append(im.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UserError(
                f"reference image {path} is too large to decode safely ({exc}); use at most {MAX_REFERENCE_PIXELS:,} "
                "pixels"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(f"reference image {path} cannot be read as an image ({exc})") from exc
    return images


def _check_reference_size(path: Path, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise UserError(f"reference image {path} has no pixels ({width}x{height})")
    if width * height > MAX_REFERENCE_PIXELS:
        raise UserError(
            f"reference image {path} is {width}x{height} = {width * height:,} pixels, more than the "
            f"{MAX_REFERENCE_PIXELS:,} allowed (a decompression bomb?); downscale it first"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(
            f"reference image {path} is {width}x{height}: aspect ratio above {MAX_ASPECT}:1, which the MLLM's image "
            "processor cannot take; crop it"
        )


def check_arguments(args: argparse.Namespace, max_steps: int) -> None:
    """Refuse values that would crash, hang or exhaust memory later, naming the flag (before any model loads)."""
    if not args.ref and args.scale != 0:
        raise UserError("give the reference group with --ref IMAGE (repeat it), or --scale 0 for text-only SDXL")
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise UserError(
                f"{flag} is {len(text):,} characters; give at most {MAX_PROMPT_CHARS:,} (the limit serving applies too)"
            )
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if not 1 <= args.steps <= max_steps:
        raise UserError(f"--steps must be between 1 and {max_steps} (the scheduler's training steps), got {args.steps}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise UserError(f"{flag} must be between 1 and {MAX_SIDE} pixels (a multiple of 8), got {value}")
    if not 0 <= args.seed < 2**64:
        raise UserError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")
    for flag, value in (("--guidance", args.guidance), ("--scale", args.scale)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give a file name such as {args.out / 'generated.png'}")


def scheduler_steps(sdxl: Path) -> int:
    """``num_train_timesteps`` of the base model's scheduler (the most DDIM steps it can take)."""
    try:
        config = json.loads((sdxl / "scheduler" / "scheduler_config.json").read_text())
        return int(config.get("num_train_timesteps", 1000))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1000


def pick_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UserError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return requested


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def speed_options(args: argparse.Namespace):
    from easyref.sampler_speed import SpeedOptions

    return SpeedOptions(
        fuse_qkv=args.fuse_qkv,
        channels_last=args.channels_last,
        compile=args.compile,
        vae_slicing=args.vae_slicing,
        vae_tiling=args.vae_tiling,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from easyref.captions import CaptionFit
    from easyref.sampler import EasyRefSampler, base_paths
    from easyref.threads import configure_cpu_threads

    configure_cpu_threads(device=args.device)

    sdxl, mllm = base_paths(args.base)
    check_arguments(args, scheduler_steps(sdxl))
    references = load_references(args.ref)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    if args.checkpoint is None:
        print(UNTRAINED_WARNING.format(seed=args.seed), file=sys.stderr)
    torch.manual_seed(args.seed)  # the untrained parts' initialisation (and anything else drawn) follows --seed
    sampler = EasyRefSampler.from_pretrained(sdxl, mllm, checkpoint=args.checkpoint, device=device, torch_dtype=dtype)
    sampler.speed_up(speed_options(args))
    images = sampler(
        [args.prompt],
        [references] if references else None,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        generator=args.seed,
        scale=args.scale,
    )
    fit = CaptionFit.shared(sampler.pipe)
    if fit.cut:
        print(
            f"note: --prompt is longer than the SDXL text encoders' {fit.limit} tokens; they read it up to the last "
            f"whole word that fits: {fit.fit(args.prompt)!r} (the MLLM reads all of it)",
            file=sys.stderr,
        )
    paths = output_paths(args.out, len(images))
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot create its folder ({exc})") from exc
    for image, path in zip(images, paths, strict=True):
        try:
            image.save(path)
        except OSError as exc:
            raise UserError(f"--out {path}: cannot write the image ({exc})") from exc
        print(f"wrote {path}")
    return 0
