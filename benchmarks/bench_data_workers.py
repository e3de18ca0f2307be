"""Training samples/s with the data work (image decoding, CFG drops, the MLLM processor) in DataLoader worker
processes against in the training process, at the same settings.

Run:  .venv/bin/python benchmarks/bench_data_workers.py [--steps 20] [--workers 2] [--threads 1] [--trials 2]

It writes the tiny models and the demo data to a temporary folder (or takes ``--base`` / ``--data``), builds a
stage-1 :class:`~easyref.train.loop.Trainer` with the tiny profile's settings from ``params.yaml`` (batch size,
reference pixel limits, tokens) once per setting, and times, alternately per trial:

- ``loader``: the loader alone (decode + drops + MLLM processing of ``--steps`` micro-batches), samples/s;
- ``train``: whole optimizer steps (loader + VAE/text encoding + forward/backward + AdamW), samples/s.

``num_workers`` 0 (all in the training process) against ``--workers`` (forked workers, one CPU thread each). The
training process uses ``--threads`` torch threads (chosen on purpose: the workers need cores too). Prints each median
and the ratio workers / in-process. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tiny_inputs import tiny_inputs


def build_trainer(args: argparse.Namespace, workers: int, out: Path):
    from easyref.config import from_dict, load_yaml
    from easyref.model import ModelConfig
    from easyref.train import distributed as D
    from easyref.train.config import TrainConfig
    from easyref.train.loop import Trainer

    train = load_yaml(args.params)["train"]
    config = TrainConfig(
        base=str(args.base),
        data=str(args.data),
        batch_size=train["batch_size"],
        max_steps=args.steps + args.warmup,
        save_every=0,
        preview_every=-1,
        num_workers=workers,
        model=from_dict(ModelConfig, train["model"]),
    )
    trainer = Trainer(config, out, None, D.setup())
    trainer.build()
    return trainer


def loader_rate(trainer, steps: int, warmup: int) -> float:
    batches = trainer.batches()
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * trainer.config.batch_size / (time.perf_counter() - start)


def train_rate(trainer, steps: int, warmup: int) -> float:
    batches = trainer.batches()
    for step in range(warmup):
        trainer.train_step(step, batches)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.train_step(step, batches)
    return steps * trainer.config.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="tiny models folder (default: written to a temporary folder)")
    parser.add_argument("--data", type=Path, help="folder of groups (default: demo data in a temporary folder)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings (train:) to use")
    parser.add_argument("--steps", type=int, default=20, help="timed micro-batches / optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers to compare with 0 (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process (default 1)")
    parser.add_argument("--trials", type=int, default=2, help="alternating runs of each setting (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_workers_"))
    args.base, args.data = tiny_inputs(tmp, args.base, args.data)

    settings = (0, args.workers)
    trainers = {w: build_trainer(args, w, tmp / f"out{w}") for w in settings}
    results: dict[str, dict[int, list[float]]] = {
        "loader": {w: [] for w in settings},
        "train": {w: [] for w in settings},
    }
    for trial in range(args.trials):
        for w in settings:
            results["loader"][w].append(loader_rate(trainers[w], args.steps, args.warmup))
            results["train"][w].append(train_rate(trainers[w], args.steps, args.warmup))
            print(
                f"trial {trial} num_workers={w}: loader {results['loader'][w][-1]:.1f} samples/s, "
                f"train {results['train'][w][-1]:.2f} samples/s",
                flush=True,
            )
    batch = trainers[0].config.batch_size
    print(f"batch {batch}, training process {args.threads} thread(s), workers 1 thread each")
    share = statistics.median(results["train"][0]) / statistics.median(results["loader"][0])
    print(f"data work (decode + drops + MLLM processing) in the in-process step: {share:.0%} of its time")
    for what, rates in results.items():
        before, after = statistics.median(rates[0]), statistics.median(rates[args.workers])
        print(
            f"{what:>6}: num_workers=0 {before:.2f} samples/s, num_workers={args.workers} {after:.2f} samples/s, "
            f"ratio {after / before:.2f}x"
        )


if __name__ == "__main__":
    main()
