"""Notices that tell the user nothing are dropped where they arise, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from easyref.base_models import BaseModels
base = BaseModels.load(sys.argv[1] + "/sdxl")  # training's, generation's and evaluation's way in: the SDXL pipeline
from transformers.utils import import_utils
import_utils.logger.warning("another notice of the same logger")
import_utils.logger.warning("`CLIPImageProcessor` requires torchvision (not installed) and something else")
"""


def test_the_torchvision_fallback_notice_is_not_printed_and_other_warnings_are(tiny_models):
    """`make demo` printed "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and
    `SiglipImageProcessor`) once per process: 18 lines. A fresh interpreter loading the base prints neither, while
    other records of that logger, even ones that start alike, still reach stderr."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_models)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "falling back to" not in done.stderr, done.stderr
    assert "another notice of the same logger" in done.stderr
    assert "requires torchvision (not installed) and something else" in done.stderr
