"""What the benchmarks that read a finished ``make demo`` share: their flags, and the demo's evaluation settings,
per-image table and test samples."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def demo_arguments(doc: str) -> argparse.Namespace:
    """``--demo`` (the repository where ``make demo`` ran) and ``--threads`` (torch CPU threads, set here)."""
    import torch

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("."), help="the repository where `make demo` ran")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def demo_outputs(root: Path) -> tuple[Any, Any]:
    """The demo's ``evaluate`` settings (params.yaml) and its per-image table (``outputs/eval/samples.parquet``)."""
    import pandas as pd

    from easyref.config import load_section
    from easyref.evaluate.config import EvaluateConfig

    config = load_section(EvaluateConfig, root / "params.yaml", "evaluate", {})
    return config, pd.read_parquet(root / "outputs" / "eval" / "samples.parquet")


def demo_samples(root: Path, section: str) -> dict[str, Any]:
    """The test samples of one section of the demo's split, by sample id."""
    from easyref.evaluate.samples import load_split

    split = load_split(root / "data" / "split" / f"{section}.parquet", root / "data" / "ingested")
    return {s.sample_id: s for s in split}
