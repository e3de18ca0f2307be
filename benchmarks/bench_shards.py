"""Training loader samples/s from packed shards against from the image files, side by side in one run.

    python benchmarks/bench_shards.py [--size 256] [--resolution 256] [--workers 0] [--trials 3] [--s3]

It writes the demo data (``easyref demo-data --size``), ingests and splits it, and packs ``train.parquet``
(``easyref pack``) into a temporary folder (with ``--s3`` also to a moto S3 server on loopback), then times, trial
after trial in turn, the trainer's loader over the stage-1 dataset: the global-order sampler, ``EpochIndexed``,
decoding, centre crop, tensor conversion and the reference images (the trainer's ``collate``; no MLLM processing, no
model), for ``--samples`` samples with ``--workers`` DataLoader workers. Prints each source's median samples/s and the
ratio to the files. One torch thread per process (``torch.set_num_threads(1)``): the loader's work is PIL's, which
torch's threads do not speed up, and the workers need the cores. Nothing is asserted.

Both sources sit in this machine's page cache, so the figures compare the read paths' CPU cost (one ``pread`` of a
group's byte range against one ``open`` per image), not a network file system against object storage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def easyref(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "easyref.cli", *args], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, size: int) -> tuple[Path, Path, Path]:
    """Demo data -> ingest -> split -> pack; returns the split table, the image root and the packed folder."""
    easyref("demo-data", "--out", str(work / "raw"), "--size", str(size))
    easyref("ingest", str(work / "raw"), "--out", str(work / "ingested"), "--no-progress", "--max-side", str(size))
    easyref("split", "--manifest", str(work / "ingested" / "manifest.parquet"), "--out", str(work / "split"),
            "--held-out-groups", "2", "--held-in-groups", "2")  # fmt: skip
    table = work / "split" / "train.parquet"
    easyref("pack", "--split", str(table), "--image-root", str(work / "ingested"), "--out", str(work / "shards"))
    return table, work / "ingested", work / "shards"


@contextlib.contextmanager
def moto_s3(table: Path, root: Path) -> Iterator[str]:
    """A moto S3 server on loopback, in its own process (not this one's GIL), with the split packed to
    ``s3://shards/train``; yields that URL."""
    import socket

    import boto3

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ[key] = value
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        endpoint = os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="shards")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        easyref("pack", "--split", str(table), "--image-root", str(root), "--out", "s3://shards/train")
        yield "s3://shards/train"
    finally:
        server.terminate()
        server.wait()


def rate(data: str, root: Path, args: argparse.Namespace) -> float:
    """Samples/s of the trainer's loader over ``data`` (build excluded, first batch excluded)."""
    from torch.utils.data import DataLoader

    from easyref.train.data import EpochIndexed, GlobalOrderSampler, build_dataset, collate

    dataset = build_dataset(data, stage="pretrain", resolution=args.resolution, max_references=28, image_root=root)
    steps = args.samples // args.batch
    sampler = GlobalOrderSampler(len(dataset), seed=0, batch_size=args.batch, grad_accum=1, rank=0, world_size=1,
                                 start_step=0, max_steps=steps + 1)  # fmt: skip
    loader = iter(DataLoader(EpochIndexed(dataset), batch_size=args.batch, sampler=sampler, collate_fn=collate,
                             num_workers=args.workers))  # fmt: skip
    next(loader)  # worker start-up and the first batch
    start = time.perf_counter()
    count = sum(len(batch["caption"]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="demo image side in pixels (ingested at this size)")
    parser.add_argument("--resolution", type=int, default=256, help="training target side")
    parser.add_argument("--samples", type=int, default=512, help="samples timed per trial")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--s3", action="store_true", help="also from a moto S3 server on loopback")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        table, root, shards = prepare(Path(tmp), args.size)
        sources = {"files": str(table), "shards (local)": str(shards)}
        if args.s3:
            sources["shards (moto S3)"] = stack.enter_context(moto_s3(table, root))
        results: dict[str, list[float]] = {name: [] for name in sources}
        for trial in range(args.trials):
            for name, data in sources.items():
                results[name].append(rate(data, root, args))
                print(f"trial {trial + 1} {name:18s} {results[name][-1]:8.1f} samples/s", flush=True)
    files = statistics.median(results["files"])
    print(f"\nstage-1 loader, {args.samples} samples, batch {args.batch}, {args.workers} workers, "
          f"{args.size} px images, {args.resolution} px targets (median of {args.trials}):")  # fmt: skip
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:18s} {median:8.1f} samples/s   ratio to files {median / files:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
