"""Stage-1 training speed on the tiny profile: conditioning cache off / cold / warm, and eager vs compiled UNet.

Run:  .venv/bin/python benchmarks/bench_train_cache.py [--steps 40] [--threads 1] [--base models/tiny --data data/raw]

It writes the tiny models and the demo data to a temporary folder (or takes ``--base`` / ``--data``) and runs the
tiny profile's ``pretrain`` stage (params.yaml's ``train:`` settings) in this process, one thread (``--threads``,
chosen on purpose: the 2-core dev machine gives each of the demo's two processes one):

- ``cold``: ``cache_dir`` set to an empty folder: every sample's first visit is encoded and written;
- then ``--trials`` times, alternating: ``off`` (no cache, eager UNet: the reference for both comparisons) and
  ``warm`` (the same run over the filled cache: every sample is read);
- ``compiled``: no cache, ``compile_unet: true``, with a fresh inductor cache (so the warm-up is a real compile),
  followed by one more ``off`` run.

Then it times the frozen encoders alone (VAE + both text encoders) per batch without and with the warm cache.

Each run goes through the Trainer's own steps (``build``, then ``train_step``; no MLflow, no checkpoints) and times
every step in wall-clock and in this process's CPU time. Steps/s are from the median CPU time per step after the
first ``--skip`` steps (the compile warm-up and first-call costs): with one thread, CPU time is what the other jobs
of a shared machine change least (wall-clock is printed too). The warm-up is the wall-clock time of the first
``--skip`` steps over the median; several runs of one kind give the median of their figures. Prints the figures and ratios side by side. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from tiny_inputs import tiny_inputs  # the script's folder is on sys.path


def run(args: argparse.Namespace, tmp: Path, name: str, **overrides: object) -> dict[str, float]:
    """One stage-1 run through the Trainer's own steps (build, then ``train_step``), each step timed in wall-clock
    and in this process's CPU time (what other jobs on the machine change least)."""
    from easyref.train import distributed as D
    from easyref.train.config import load_train_config
    from easyref.train.loop import Trainer

    config = load_train_config(
        args.params,
        "pretrain",
        {"base": str(args.base), "data": str(args.data), "max_steps": args.steps, "save_every": 0, **overrides},
    )
    env = D.setup()
    try:
        trainer = Trainer(config, tmp / "runs" / name, None, env)
        trainer.build()
        batches = trainer.batches()
        wall, cpu = [], []
        for step in range(config.max_steps):
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(step, batches)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        D.teardown()
    steady_wall, steady_cpu = statistics.median(wall[args.skip :]), statistics.median(cpu[args.skip :])
    hits = trainer.cache.counts()["cache_hits"] if trainer.cache is not None else 0
    return {
        "cpu_ms": steady_cpu * 1000,
        "wall_ms": steady_wall * 1000,
        "steps_per_s": 1 / steady_cpu,
        "warmup_s": sum(wall[: args.skip]) - args.skip * steady_wall,
        "hits": hits,
    }


def conditioning_ms(args: argparse.Namespace, cache_dir: str, batches: int = 10, reps: int = 5) -> dict[str, float]:
    """Median ms per batch of the frozen encoders alone (VAE + both text encoders), without and with the warm
    cache, interleaved rep by rep over the same batches (the share of a step the cache can save)."""
    import json

    from easyref.base_models import BaseModels
    from easyref.train.cache import ConditioningCache
    from easyref.train.config import load_train_config
    from easyref.train.data import build_dataset, collate
    from easyref.train.recipe import Conditioner, step_generator

    config = load_train_config(args.params, "pretrain", {"base": str(args.base), "data": str(args.data)})
    base = BaseModels.load(Path(args.base) / "sdxl", Path(args.base) / "mllm", config.model)
    drops = (config.drop_text, config.drop_image, config.drop_both)
    plain, cached = Conditioner(base, drops), Conditioner(base, drops, cache=ConditioningCache.open(cache_dir, base))
    unet = json.loads((Path(args.base) / "sdxl" / "unet" / "config.json").read_text())
    size = base.vae_scale_factor * unet["sample_size"]  # the stage's native resolution, as the trainer picks it
    dataset = build_dataset(args.data, stage="pretrain", resolution=size, max_references=4, image_root="", seed=0)
    data = [collate([dataset[2 * i], dataset[2 * i + 1]]) for i in range(batches)]
    times: dict[str, list[float]] = {"encoders, no cache": [], "encoders, warm cache": []}

    def frozen(conditioner: Conditioner, batch: dict) -> None:
        conditioner.encode_latents(batch["target"], step_generator(0, 0, 0, 0))
        conditioner.encode_text(batch["caption"])

    for _ in range(reps):
        for name, fn in (
            ("encoders, no cache", lambda b: frozen(plain, b)),
            ("encoders, warm cache", lambda b: frozen(cached, b)),
        ):
            for batch in data:
                t0 = time.perf_counter()
                fn(batch)
                times[name].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="tiny models folder (default: written to a temporary folder)")
    parser.add_argument("--data", type=Path, help="folder of groups (default: demo data in a temporary folder)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters (the tiny profile)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the median (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo's ranks)")
    parser.add_argument("--trials", type=int, default=3, help="off and warm runs, alternating (default 3)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compiled run")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_cache_"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # a cold compile, not one from an earlier run
    args.base, args.data = tiny_inputs(tmp, args.base, args.data)

    import torch

    torch.set_num_threads(args.threads)
    cache = str(tmp / "cache")
    trials: dict[str, list[dict[str, float]]] = {"off": [], "cold": [], "warm": []}
    trials["cold"].append(run(args, tmp, "cold", cache_dir=cache))
    for trial in range(args.trials):  # off and warm alternate, so a change of machine load hits both
        trials["off"].append(run(args, tmp, f"off_{trial}"))
        trials["warm"].append(run(args, tmp, f"warm_{trial}", cache_dir=cache))
    if args.compile:
        trials["compiled"] = [run(args, tmp, "compiled", compile_unet=True)]
        trials["off"].append(run(args, tmp, f"off_{args.trials}"))
    results = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in trials.items()}
    size = sum(p.stat().st_size for p in Path(cache).rglob("*.safetensors"))
    entries = len(list(Path(cache).rglob("*.safetensors")))
    print(
        f"\n{args.steps} stage-1 steps per run, tiny profile ({args.params}), {args.threads} thread(s), "
        f"median of steps {args.skip + 1}..{args.steps}; cache hits in the cold run {results['cold']['hits']:.0f}"
    )
    print(f"{'run':>10} {'runs':>5} {'CPU ms/step':>12} {'steps/s (CPU)':>14} {'wall ms/step':>13} {'warm-up s':>10}")
    for name, r in results.items():
        print(
            f"{name:>10} {len(trials[name]):5d} {r['cpu_ms']:12.1f} {r['steps_per_s']:14.2f} {r['wall_ms']:13.1f} "
            f"{r['warmup_s']:10.2f}"
        )
    pairs = zip(trials["off"], trials["warm"], strict=False)
    print(
        "each off/warm pair, CPU steps/s ratio warm/off: "
        + ", ".join(f"{w['steps_per_s'] / o['steps_per_s']:.2f}" for o, w in pairs)
    )
    ratios = ", ".join(f"{k} {results[k]['steps_per_s'] / results['off']['steps_per_s']:.2f}x" for k in results)
    print(f"steps/s ratio to off (medians, CPU time): {ratios}")
    print(f"cache: {entries} entries, {size / 2**20:.2f} MiB on disk")
    parts = conditioning_ms(args, cache)
    print("per batch of 2, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
