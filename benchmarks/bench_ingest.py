"""Time ``easyref ingest`` on the demo data with 1 and with 2 worker processes (images/s).

    python benchmarks/bench_ingest.py [--size 128] [--repeat 2]

Each run ingests into a fresh folder (no cache), through the real command in a child process, so start-up costs
(worker spawning included) count. The demo data is written once per size. For context it also measures how much
parallel CPU the machine really gives: the speed-up of a pure-Python loop run in 2 processes instead of 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from easyref.data.demo import write_demo_data


def _burn(n: int) -> None:
    total = 0
    for i in range(n):
        total += i


def cpu_parallelism(n: int = 5_000_000) -> float:
    """Throughput of 2 processes running a CPU-bound loop, relative to 1 (2.0 on two free cores)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_burn, [1, 1])  # start both workers
        t0 = time.perf_counter()
        pool.map(_burn, [n])
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.map(_burn, [n, n], chunksize=1)
        two = time.perf_counter() - t0
    return 2 * one / two


def time_ingest(source: Path, out: Path, workers: int) -> float:
    command = [sys.executable, "-m", "easyref.cli", "ingest", str(source), "--out", str(out)]
    command += ["--workers", str(workers), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="demo image side (default 128, as easyref demo-data)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per worker count; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "raw"
        n_images = write_demo_data(source, size=args.size)
        rates = {}
        for workers in (1, 2):
            best = min(time_ingest(source, Path(tmp) / f"out-{workers}-{r}", workers) for r in range(args.repeat))
            rates[workers] = n_images / best
            print(f"workers={workers}: {n_images} images in {best:5.2f} s = {rates[workers]:6.1f} images/s")
    print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x")
    print(f"CPU parallelism of this machine (2 vs 1 busy processes): {cpu_parallelism():.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
