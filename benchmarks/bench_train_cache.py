"""Stage-1 training speed on the tiny profile: conditioning cache off / cold / warm, and eager vs compiled UNet.

Run:  .venv/bin/python benchmarks/bench_train_cache.py [--steps 40] [--threads 1] [--base models/tiny --data data/raw]

It writes the tiny models and the demo data to a temporary folder (or takes ``--base`` / ``--data``) and runs the
tiny profile's ``pretrain`` stage (params.yaml's ``train:`` settings) in this process, one thread (``--threads``,
chosen on purpose: the 2-core dev machine gives each of the demo's two processes one), five times in a row:

- ``off``: no cache, eager UNet (the reference for both comparisons);
- ``cold``: ``cache_dir`` set to an empty folder: every sample's first visit is encoded and written;
- ``warm``: the same run again over the filled cache: every sample is read;
- ``compiled``: no cache, ``compile_unet: true``, with a fresh inductor cache (so the warm-up is a real compile);
- ``off again``: the reference once more, to show the drift of the machine during the benchmark.

Steps/s are from the median of each run's MLflow ``step_time_s`` after the first ``--skip`` steps (the compile
warm-up and first-call costs), reported separately as the extra time of those steps over the median. Prints the
figures and ratios side by side. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_threads import tiny_inputs  # the script's folder is on sys.path


def step_times(uri: str, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, "step_time_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def run(args: argparse.Namespace, tmp: Path, name: str, **overrides: object) -> dict[str, float]:
    from easyref.train.config import load_train_config
    from easyref.train.loop import train

    config = load_train_config(
        args.params,
        "pretrain",
        {
            "base": str(args.base),
            "data": str(args.data),
            "max_steps": args.steps,
            "save_every": 0,
            "preview_every": -1,
            "experiment": f"bench-train-cache-{name}",
            **overrides,
        },
    )
    t0 = time.perf_counter()
    result = train(config, out=tmp / "runs" / name)
    wall = time.perf_counter() - t0
    times = step_times(os.environ["MLFLOW_TRACKING_URI"], result.run_id)
    steady = statistics.median(times[args.skip :])
    warmup = sum(times[: args.skip]) - args.skip * steady
    return {"steps_per_s": 1 / steady, "step_ms": steady * 1000, "warmup_s": warmup, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="tiny models folder (default: written to a temporary folder)")
    parser.add_argument("--data", type=Path, help="folder of groups (default: demo data in a temporary folder)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters (the tiny profile)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the median (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the demo's ranks)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_cache_"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")  # a cold compile, not one from an earlier run
    os.environ.setdefault("TQDM_DISABLE", "1")
    tiny_inputs(args, tmp)

    import torch

    torch.set_num_threads(args.threads)
    cache = str(tmp / "cache")
    results = {
        "off": run(args, tmp, "off"),
        "cold": run(args, tmp, "cold", cache_dir=cache),
        "warm": run(args, tmp, "warm", cache_dir=cache),
        "compiled": run(args, tmp, "compiled", compile_unet=True),
        "off again": run(args, tmp, "off_again"),
    }
    size = sum(p.stat().st_size for p in Path(cache).rglob("*.safetensors"))
    entries = len(list(Path(cache).rglob("*.safetensors")))
    print(
        f"\n{args.steps} stage-1 steps per run, tiny profile ({args.params}), {args.threads} thread(s), "
        f"median of steps {args.skip + 1}..{args.steps}"
    )
    print(f"{'run':>10} {'steps/s':>8} {'ms/step':>8} {'warm-up s':>10} {'wall s':>7}")
    for name, r in results.items():
        print(f"{name:>10} {r['steps_per_s']:8.2f} {r['step_ms']:8.1f} {r['warmup_s']:10.2f} {r['wall_s']:7.1f}")
    off = statistics.mean([results["off"]["steps_per_s"], results["off again"]["steps_per_s"]])
    print(
        f"steps/s ratio to off (mean of both off runs): cold {results['cold']['steps_per_s'] / off:.2f}x, "
        f"warm {results['warm']['steps_per_s'] / off:.2f}x, compiled UNet {results['compiled']['steps_per_s'] / off:.2f}x "
        f"(compile warm-up {results['compiled']['warmup_s']:.1f} s)"
    )
    print(f"cache: {entries} entries, {size / 2**20:.2f} MiB on disk")


if __name__ == "__main__":
    main()
