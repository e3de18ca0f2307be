"""Running a script of benchmarks/ the way a user does: a fresh interpreter, one CPU thread, its JSON read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, args: list[str], out: Path, timeout: float = 300) -> tuple[dict[str, Any], str]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--out out``; returns the JSON it wrote and its stdout."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout
