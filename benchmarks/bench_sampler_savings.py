"""Each of the sampler's savings as a ratio (with / without it), measured side by side in one run.

Run:  .venv/bin/python benchmarks/bench_sampler_savings.py [--steps 30] [--repeats 3] [--no-compile]

Tiny profile (random EasyRef parts with the paper's settings: 64 reference tokens, ~336^2 px references), 64x64 px
images, DDIM, CFG 7.5, one CPU thread per process (``torch.set_num_threads(1)``). Every variant runs in the same
process, interleaved round by round so machine noise hits all alike; the least over ``--repeats`` rounds. Times are
the process's CPU seconds (``time.process_time``): with one thread that is the work done, which the load of other
processes on a shared machine disturbs far less than wall-clock time (compile's first call is wall-clock). A ratio
below 1 is a saving.

1. reuse: an evaluation-like workload, 4 (group, caption) samples each generated twice (two seeds, as evaluate
   generates a sample per method and the reference gain re-encodes it), with ``sampler.reuse_references()`` against
   without; the MLLM part alone and the whole.
2. text-only: one image at reference scale 0 now (no MLLM) against before (both branches encoded, then ignored).
3. fuse_qkv, channels_last, compile: one image from precomputed reference states (the denoising loop and the VAE),
   each option alone against the plain sampler; compile's first call (the compilation) is reported apart.
4. VAE slicing and tiling: decoding 2 images of 512x512 px, each variant in a fresh child process: seconds and the
   peak resident memory the decode adds (sampled every millisecond; medians).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampler import group  # noqa: E402

PROMPT = "a red square on a blue background"
PARTS = ("reuse", "text-only", "options", "vae")


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Least CPU seconds of each variant over ``repeats`` rounds, each round running every variant once (other
    processes only ever add time, so the least is the steadiest estimate of the work)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(repeats):
        for name in order:
            start = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - start)
        order.reverse()  # ABBA: neither variant always runs first
    return {name: min(t) for name, t in times.items()}


def report(label: str, new: float, old: float, unit: str = "s") -> None:
    ratio = f"{new / old:.3f}" if old else "n/a"
    print(f"  {label:<44} {new:9.3f} {unit} vs {old:9.3f} {unit}   ratio {ratio}")


def build(base: Path, options=None):
    from easyref.model import ModelConfig
    from easyref.sampler import EasyRefSampler

    torch.manual_seed(0)  # every sampler gets the same random EasyRef parts
    sampler = EasyRefSampler.from_pretrained(base / "sdxl", base / "mllm", model_config=ModelConfig())
    return sampler.speed_up(options) if options is not None else sampler


def bench_reuse(base: Path, sampler, steps: int, repeats: int) -> None:
    samples = [(group(3, shade), caption) for shade in (0, 60) for caption in (PROMPT, "a red square, close-up")]
    kw = dict(num_inference_steps=steps, progress=False)
    reusing = build(base)  # a second sampler with the same weights, inside a reuse block for the whole round

    def encode_all(s) -> None:
        for _ in range(2):
            for refs, caption in samples:
                s.encode_references([refs], [caption]), s.encode_unconditional()

    def reuse(fn: Callable[[object], None]) -> Callable[[], None]:
        def run() -> None:
            with reusing.reuse_references():
                fn(reusing)

        return run

    t = interleaved({"mllm": lambda: encode_all(sampler), "mllm reuse": reuse(encode_all)}, repeats)
    print("1. reference states reused per (group, caption): 4 samples x 2 generations")
    report("MLLM passes only (16 -> 5 encodings)", t["mllm reuse"], t["mllm"])
    # The whole workload, the two samplers alternating image by image so that load from other processes hits both.
    totals: dict[str, list[float]] = {"plain": [], "reuse": []}
    for _ in range(repeats):
        spent = dict.fromkeys(totals, 0.0)
        with reusing.reuse_references():
            for i, (seed, (refs, caption)) in enumerate((seed, x) for seed in range(2) for x in samples):
                pair = [("plain", sampler), ("reuse", reusing)]
                for name, s in pair if i % 2 else pair[::-1]:
                    start = time.process_time()
                    s([caption], [refs], generator=seed, **kw)
                    spent[name] += time.process_time() - start
        for name in totals:
            totals[name].append(spent[name])
    report(f"whole workload, 8 images ({steps} steps)", min(totals["reuse"]), min(totals["plain"]))


def bench_text_only(sampler, steps: int, repeats: int) -> None:
    refs = group(3)
    kw = dict(num_inference_steps=steps, generator=0, scale=0.0, progress=False)

    def before() -> None:  # what the sampler did at scale 0: encode both branches, then ignore them
        sampler.encode_references([refs], [PROMPT]), sampler.encode_unconditional()
        sampler([PROMPT], [refs], **kw)

    t = interleaved({"before": before, "now": lambda: sampler([PROMPT], [refs], **kw)}, repeats)
    print("2. text-only (reference scale 0): no MLLM pass")
    report("one image", t["now"], t["before"])


def bench_options(base: Path, plain, steps: int, repeats: int, compile_unet: bool) -> None:
    from easyref.sampler_speed import SpeedOptions

    cond, uncond = plain.encode_references([group(3)], [PROMPT]), plain.encode_unconditional()
    kw = dict(
        reference_states=cond, negative_reference_states=uncond, num_inference_steps=steps, generator=0, progress=False
    )
    options = {"fuse_qkv": SpeedOptions(fuse_qkv=True), "channels_last": SpeedOptions(channels_last=True)}
    if compile_unet:
        options["compile"] = SpeedOptions(compile=True)
    samplers = {name: build(base, opt) for name, opt in options.items()}
    warm = {}
    for name, sampler in {"plain": plain, **samplers}.items():
        start = time.perf_counter()
        sampler([PROMPT], **kw)  # warm-up (compilation for "compile", which runs in worker processes too)
        warm[name] = time.perf_counter() - start
    t = interleaved(
        {name: (lambda s=s: s([PROMPT], **kw)) for name, s in {"plain": plain, **samplers}.items()}, repeats
    )
    print(f"3. opt-in options, one image from given reference states ({steps} steps)")
    for name in samplers:
        report(name, t[name], t["plain"])
    if compile_unet:
        print(f"  compile: first call {warm['compile']:.1f} s (compilation) vs {warm['plain']:.2f} s eager")


def vae_child(base: Path, mode: str, size: int, count: int) -> None:
    """In a fresh process: decode ``count`` random latents of ``size`` px; print seconds and the added peak memory."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(base / "sdxl" / "vae").eval()
    if mode == "slicing":
        vae.enable_slicing()
    elif mode == "tiling":
        vae.enable_tiling()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(count, vae.config.latent_channels, size // factor, size // factor)
    before, peak, done = rss(), [0], threading.Event()

    def watch() -> None:  # the resident size, sampled every millisecond while decoding
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.process_time()
    with torch.no_grad():
        vae.decode(latents / vae.config.scaling_factor)
    seconds = time.process_time() - start
    done.set()
    watcher.join()
    print(json.dumps({"seconds": seconds, "peak_mb": (max(peak[0], rss()) - before) / 2**20}))


def rss() -> int:
    """Resident bytes of this process now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def bench_vae(base: Path, repeats: int, size: int = 512, count: int = 2) -> None:
    runs: dict[str, list[dict[str, float]]] = {"none": [], "slicing": [], "tiling": []}
    for _ in range(repeats):
        for mode in runs:
            cmd = [sys.executable, __file__, "--vae-child", mode, str(base), str(size), str(count)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_mb")} for m, rs in runs.items()}
    print(f"4. VAE decode of {count} images at {size}x{size} px (fresh process each)")
    for mode in ("slicing", "tiling"):
        report(f"{mode}: time", med[mode]["seconds"], med["none"]["seconds"])
        report(f"{mode}: peak memory added", med[mode]["peak_mb"], med["none"]["peak_mb"], unit="MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it needs a C++ compiler)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which measurements to run")
    parser.add_argument("--vae-child", nargs=4, metavar=("MODE", "BASE", "SIZE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vae_child:
        mode, base, size, count = args.vae_child
        vae_child(Path(base), mode, int(size), int(count))
        return
    torch.set_num_threads(1)
    from easyref.tiny_models import write_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        base = write_tiny_models(Path(tmp) / "tiny", seed=0)
        sampler = build(base)
        print(f"tiny profile, 64x64 px, DDIM {args.steps} steps, CFG 7.5, 1 thread, least of {args.repeats} rounds")
        if "reuse" in args.parts:
            bench_reuse(base, sampler, args.steps, args.repeats)
        if "text-only" in args.parts:
            bench_text_only(sampler, args.steps, args.repeats)
        if "options" in args.parts:
            bench_options(base, sampler, args.steps, args.repeats, compile_unet=not args.no_compile)
        if "vae" in args.parts:
            bench_vae(base, args.repeats)


if __name__ == "__main__":
    main()
