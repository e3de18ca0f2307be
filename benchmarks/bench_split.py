"""Time ``easyref split`` on a manifest of the paper's size: about 1M groups and 2.1M images.

    python benchmarks/bench_split.py [--groups 1000000] [--work DIR]

The manifest is synthetic (group sizes 1-5, mean 2.1; ingest-like columns). The split runs in a child process so
that its peak RSS (resource.getrusage of the children) is its own. Targets: under 10 s and 2 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TARGET_SECONDS = 10.0
TARGET_GIB = 2.0


def make_manifest(path: Path, n_groups: int, seed: int = 0) -> int:
    """Write a manifest with ``n_groups`` groups of 1-5 images (mean 2.1); returns the number of images."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3, 4, 5], size=n_groups, p=[0.40, 0.30, 0.15, 0.10, 0.05])
    n = int(sizes.sum())
    group_index = np.repeat(np.arange(n_groups), sizes)
    image_ids = np.char.mod("%032x", rng.integers(0, 2**62, size=n, dtype=np.int64))
    groups = np.char.mod("group-%07d", group_index)
    table = pa.table(
        {
            "image_id": pa.array(image_ids.tolist()),
            "path": pa.array([f"images/{i[:2]}/{i}.jpg" for i in image_ids.tolist()]),
            "group": pa.array(groups.tolist()),
            "caption": pa.array(np.char.add("a photo of the subject of ", groups).tolist()),
            "width": pa.array(rng.integers(512, 1024, size=n), type=pa.int32()),
            "height": pa.array(rng.integers(512, 1024, size=n), type=pa.int32()),
            "source": pa.array(["bench"] * n),
            "uri": pa.array(np.char.add("s3://bucket/", image_ids).tolist()),
            "phash": pa.array(np.char.mod("%016x", rng.integers(0, 2**62, size=n, dtype=np.int64)).tolist()),
            "metadata": pa.array(["{}"] * n),
        }
    )
    pq.write_table(table, path, compression="zstd")
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, help="folder for the manifest and the split (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifest = work / "manifest.parquet"
        t0 = time.perf_counter()
        n_images = make_manifest(manifest, args.groups)
        print(
            f"manifest: {args.groups} groups, {n_images} images, {manifest.stat().st_size / 2**20:.0f} MiB "
            f"(generated in {time.perf_counter() - t0:.1f} s)"
        )
        command = [
            sys.executable,
            "-m",
            "easyref.cli",
            "split",
            "--manifest",
            str(manifest),
            "--out",
            str(work / "split"),
        ]
        t0 = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - t0
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    print(f"split wall time  {seconds:6.2f} s    target {TARGET_SECONDS:.0f} s    ratio {seconds / TARGET_SECONDS:.2f}")
    print(f"split peak RSS   {peak_gib:6.2f} GiB  target {TARGET_GIB:.0f} GiB  ratio {peak_gib / TARGET_GIB:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
