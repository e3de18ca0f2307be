"""Split and pack at the paper's size: about 1M groups and 2.1M images (metadata and tiny images), peak RSS of each.

    python benchmarks/bench_scale_split_pack.py [--groups 1000000] [--shard-mb 512] [--work DIR]

Writes a synthetic manifest (:func:`bench_split.make_manifest`: group sizes 1-5, mean 2.1) and one tiny JPEG file
per image (8x8 px, about 300 bytes: the files' count is the paper's, their bytes are not), then runs ``easyref split``
and ``easyref pack`` on the training split, each in its own child process, and prints each one's wall time, CPU time
and peak RSS (that child's own, from ``os.wait4``) next to the 2 GB target, and the shards written. Then it opens
the packed set as the trainer does (:class:`ShardDataset`, in this process) and reads a few samples. Needs about
13 GB of disk at 1M groups: 2.1M files of one 4 KB block and 4.6 GB of shards (tar's 512-byte headers and padding
dominate for tiny images). ``--reuse`` keeps the input of an
earlier run in ``--work`` (writing 2.1M files took 13 minutes on this loaded machine).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from bench_split import make_manifest

TARGET_GIB = 2.0


def write_tiny_images(manifest: Path, root: Path, variants: int = 64) -> int:
    """One small JPEG file per manifest row at ``root/<path>`` (``variants`` distinct images, reused)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(variants):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        blobs.append(buffer.getvalue())
    paths = pq.read_table(manifest, columns=["path"]).column("path").to_pylist()
    for folder in sorted({p.rsplit("/", 1)[0] for p in paths}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        (root / path).write_bytes(blobs[i % variants])
    return len(paths)


def timed(command: list[str]) -> tuple[float, float, float]:
    """Run ``command``; its wall time, CPU time (user + system) and peak RSS in GiB, all of that child alone
    (``os.wait4``'s resource usage)."""
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode})")
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1_000_000)
    parser.add_argument("--shard-mb", type=float, default=512.0)
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="keep the input already in --work (same --groups)")
    args = parser.parse_args()
    easyref = [sys.executable, "-m", "easyref.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        root = work / "ingested"
        root.mkdir(parents=True, exist_ok=True)
        manifest = root / "manifest.parquet"
        t0 = time.perf_counter()
        if args.reuse and manifest.is_file():
            n_images = pq.read_metadata(manifest).num_rows
        else:
            n_images = make_manifest(manifest, args.groups)
            write_tiny_images(manifest, root)
        print(f"input: {args.groups} groups, {n_images} images and their files ({time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
        split_s, split_cpu, split_gib = timed(
            [*easyref, "split", "--manifest", str(manifest), "--out", str(work / "split"), "--fresh"]
        )
        table = work / "split" / "train.parquet"
        pack_s, pack_cpu, pack_gib = timed([*easyref, "pack", "--split", str(table), "--image-root", str(root),
                                  "--out", str(work / "shards"), "--shard-mb", str(args.shard_mb)])  # fmt: skip
        marker = json.loads((work / "shards" / "shards.json").read_text())
        total = sum(s["bytes"] for s in marker["shards"])

        from easyref.data.dataset import DatasetConfig
        from easyref.data.shards import ShardDataset

        t0 = time.perf_counter()
        dataset = ShardDataset(work / "shards", DatasetConfig(stage="pretrain", resolution=64))
        open_s = time.perf_counter() - t0
        samples = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 100))]
        own_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    target = f"target {TARGET_GIB:.0f} GiB"
    print(f"split  {split_s:7.1f} s wall {split_cpu:7.1f} s CPU   peak RSS {split_gib:5.2f} GiB   {target}  "
          f"ratio {split_gib / TARGET_GIB:.2f}")  # fmt: skip
    print(f"pack   {pack_s:7.1f} s wall {pack_cpu:7.1f} s CPU   peak RSS {pack_gib:5.2f} GiB   {target}  "
          f"ratio {pack_gib / TARGET_GIB:.2f}   ({marker['images']} images, {marker['groups']} groups, "
          f"{len(marker['shards'])} shards, {total / 1e9:.2f} GB)")  # fmt: skip
    made = "the index and torch" if args.reuse else "the index, torch and the input's generation"
    print(f"open   {open_s:7.1f} s   ShardDataset over the index, {len(samples)} samples read; this process's peak "
          f"RSS {own_gib:.2f} GiB ({made})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
