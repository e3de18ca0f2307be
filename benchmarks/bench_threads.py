"""CPU threads per process under load: torch's default (one thread per core in every process) against the
project's choice (``easyref.threads``: cores / local processes, one each for the demo's two processes on 2 cores).

Run:  .venv/bin/python benchmarks/bench_threads.py [--steps 6] [--nproc 2] [--load 1]

It writes the tiny models and demo data to a temporary folder (or takes ``--base`` / ``--data``), starts ``--load``
bounded busy-loop processes as background load (each stops by itself after ``--load-seconds``), and runs a short
``pretrain`` stage under ``torchrun --nproc_per_node NPROC`` twice, alternately, with the same load:

- ``default``: ``OMP_NUM_THREADS`` = the number of cores (what torch picks in every process when nothing is set);
- ``per-process``: nothing set, so ``configure_cpu_threads`` picks cores // NPROC.

Prints the median seconds per optimizer step of each (from the run's MLflow ``step_time_s``, first step dropped)
and the ratio default / per-process. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tiny_inputs import tiny_inputs

from easyref.threads import available_cores


def busy_loop(seconds: float) -> None:
    """Spin one core for at most ``seconds``: a bounded synthetic background load."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x = (x * 31 + 7) % 1_000_003


def step_times(uri: str, experiment: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    history = sorted(client.get_metric_history(run.info.run_id, "step_time_s"), key=lambda m: m.step)
    return [m.value for m in history][1:] or [m.value for m in history]


def train_once(args: argparse.Namespace, tmp: Path, mode: str, trial: int) -> float:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "EASYREF_THREADS")}
    env["MLFLOW_TRACKING_URI"] = uri
    if mode == "default":
        env["OMP_NUM_THREADS"] = str(available_cores())  # explicit, or torchrun would force 1
    experiment = f"bench-threads-{mode}-{trial}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "easyref.cli",
        "train",
        "--stage",
        "pretrain",
        "--base",
        str(args.base),
        "--data",
        str(args.data),
        "--out",
        str(tmp / experiment),
        "--max-steps",
        str(args.steps),
        "--save-every",
        "0",
        "--preview-every",
        "-1",
        "--experiment",
        experiment,
    ]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return statistics.median(step_times(uri, experiment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="tiny models folder (default: written to a temporary folder)")
    parser.add_argument("--data", type=Path, help="folder of groups (default: demo data in a temporary folder)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2, as the demo)")
    parser.add_argument("--load", type=int, default=1, help="busy-loop processes of background load (default 1)")
    parser.add_argument("--load-seconds", type=float, default=900, help="upper bound of the load's life (s)")
    parser.add_argument("--trials", type=int, default=1, help="runs of each mode, interleaved (default 1)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    args.base, args.data = tiny_inputs(tmp, args.base, args.data)

    load = [multiprocessing.Process(target=busy_loop, args=(args.load_seconds,), daemon=True) for _ in range(args.load)]
    for proc in load:
        proc.start()
    results: dict[str, list[float]] = {"default": [], "per-process": []}
    try:
        for trial in range(args.trials):
            for mode in results:
                results[mode].append(train_once(args, tmp, mode, trial))
                print(f"{mode:>11}: {results[mode][-1]:.2f} s/step", flush=True)
    finally:
        for proc in load:
            proc.terminate()
            proc.join()
    default, chosen = (statistics.median(results[m]) for m in ("default", "per-process"))
    print(f"{available_cores()} cores, {args.nproc} processes, {args.load} busy-loop process(es) of load")
    print(
        f"default threads ({available_cores()} per process): {default:.2f} s/step; one per process share: "
        f"{chosen:.2f} s/step; ratio default / chosen = {default / chosen:.2f}"
    )


if __name__ == "__main__":
    main()
