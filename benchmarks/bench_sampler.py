"""Sampler speed against diffusers' SDXL pipeline, and reference-encoding time against group size.

Run:  .venv/bin/python benchmarks/bench_sampler.py [--steps 30] [--repeats 3]

For each profile ("tiny" and a 4x wider "small" tree, both random and built on the fly) it measures, side by side
in one process and interleaved so machine noise hits both alike:

1. seconds per image of ``EasyRefSampler`` against ``StableDiffusionXLPipeline`` driving the same UNet (with the
   EasyRef adapter installed) fed the same reference states through ``ip_adapter_image_embeds``; the ratio
   ours/diffusers must not exceed 1 (beyond noise);
2. seconds to encode one group of 1, 2, 4, 8 and 16 references at the paper's ~336^2 reference resolution.

Medians over ``--repeats`` runs are printed; nothing is asserted. What the sampler saves beyond diffusers (reuse,
text-only without the MLLM, opt-in options) is measured by ``benchmarks/bench_sampler_savings.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def group(n: int, shade: int = 0) -> list[Image.Image]:
    """``n`` distinct 400x360 reference images (``shade`` makes another group)."""
    images = []
    for i in range(n):
        im = Image.new("RGB", (400, 360), ((20 * i + shade) % 255, 90, 160))
        ImageDraw.Draw(im).rectangle((40 + 5 * i, 50, 300, 280), fill=(230, 40, 40))
        images.append(im)
    return images


def bench_profile(name: str, root: Path, width: int, steps: int, repeats: int, size: int) -> None:
    from diffusers import StableDiffusionXLPipeline

    from easyref.model import ModelConfig
    from easyref.sampler import EasyRefSampler
    from easyref.tiny_models import write_tiny_models

    base = write_tiny_models(root / name, seed=0, width=width)
    torch.manual_seed(0)
    sampler = EasyRefSampler.from_pretrained(base / "sdxl", base / "mllm", model_config=ModelConfig())
    pipe = StableDiffusionXLPipeline(**{**sampler.pipe.components, "unet": sampler.model.unet})
    pipe.set_progress_bar_config(disable=True)

    prompt = "a red square on a blue background"
    refs = group(3)
    cond = sampler.encode_references([refs], [prompt])
    uncond = sampler.encode_unconditional()
    ip_embeds = [torch.cat([uncond, cond])[:, None]]  # diffusers splits (negative, positive) itself

    def ours() -> None:
        sampler(
            [prompt],
            reference_states=cond,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=0,
            progress=False,
        )

    def theirs() -> None:
        pipe(
            prompt,
            ip_adapter_image_embeds=ip_embeds,
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=7.5,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
        )

    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):  # interleaved
        t_ours.append(median_time(ours, 1))
        t_theirs.append(median_time(theirs, 1))
    a, b = statistics.median(t_ours), statistics.median(t_theirs)
    unet_params = sum(p.numel() for p in sampler.model.unet.parameters()) / 1e6
    print(f"\n[{name}] UNet {unet_params:.1f}M params, {size}x{size}, {steps} DDIM steps, CFG 7.5")
    print(f"  sampler s/image: easyref {a:.3f}  diffusers SDXL pipeline {b:.3f}  ratio easyref/diffusers {a / b:.3f}")
    print("  reference encoding (one group, ~336^2 per image):")
    base_time = None
    for n in (1, 2, 4, 8, 16):
        images = group(n)
        sampler.encode_references([images], [prompt])  # warm-up for this shape
        t = median_time(lambda images=images: sampler.encode_references([images], [prompt]), repeats)
        base_time = base_time or t
        print(f"    {n:2d} refs: {t * 1000:8.1f} ms  ({t / base_time:5.2f}x the 1-ref time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", choices=["tiny", "small"], default=["tiny", "small"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        profiles = {"tiny": (1, 64), "small": (4, 96)}  # width multiplier, image side
        for name in args.profiles:
            width, size = profiles[name]
            bench_profile(name, Path(tmp), width=width, steps=args.steps, repeats=args.repeats, size=size)


if __name__ == "__main__":
    main()
