"""What the CPU benchmarks run on when not given their own: the tiny models and the demo data, written by the
project's CLI into a folder (the same commands `make demo` uses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def tiny_inputs(tmp: Path, base: Path | None, data: Path | None) -> tuple[Path, Path]:
    """``base`` and ``data`` as given, or ``tmp/models`` (``easyref tiny-models``) and ``tmp/data`` (``easyref
    demo-data``) written now."""
    easyref = [sys.executable, "-m", "easyref.cli"]
    if base is None:
        base = tmp / "models"
        subprocess.run([*easyref, "tiny-models", "--out", str(base)], check=True, stdout=subprocess.DEVNULL)
    if data is None:
        data = tmp / "data"
        subprocess.run([*easyref, "demo-data", "--out", str(data)], check=True, stdout=subprocess.DEVNULL)
    return base, data
