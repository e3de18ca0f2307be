"""Test helpers shared by the component tests and tests/test_pipeline*.py: a tiny workspace built with the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small reference images keep the tiny MLLM fast (4-9 visual tokens per image), as in tests/conftest.py.
TINY_MODEL = {"num_tokens": 8, "min_pixels": 4 * 28 * 28, "max_pixels": 9 * 28 * 28, "dropped_image_size": 56}
TINY_TRAIN = {"batch_size": 1, "save_every": 0, "preview_every": -1, "preview_steps": 2, "model": TINY_MODEL}
TINY_EVALUATE = {"steps": 2, "max_samples": 2, "batch_size": 2, "baselines": [],
                 "reference_gain": {"enabled": True, "timesteps": 1}}
TINY_SPLIT = {"held_out_groups": 4, "held_in_groups": 4}


def easyref(*args: str, cwd: Path | None = None) -> None:
    """Run an ``easyref`` command with this interpreter; raise with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "easyref.cli", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"easyref {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def component_env() -> dict[str, str]:
    """Environment in which kfp.local's subprocesses can import ``components`` (the image sets PYTHONPATH)."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def build_workspace(root: Path, groups: int = 12) -> dict[str, Path]:
    """Tiny models, demo data (``groups`` groups of 4-5 images), its ingestion and split, under ``root``."""
    paths = {"models": root / "models" / "tiny", "raw": root / "data" / "raw",
             "ingested": root / "data" / "ingested", "split": root / "data" / "split"}
    from easyref.tiny_models import write_tiny_models

    write_tiny_models(paths["models"], seed=0)
    easyref("demo-data", "--out", str(paths["raw"]), "--min-images", "4", "--max-images", "5")
    _keep_groups(paths["raw"], groups)
    easyref("ingest", str(paths["raw"]), "--out", str(paths["ingested"]), "--workers", "1", "--no-progress")
    easyref("split", "--manifest", str(paths["ingested"] / "manifest.parquet"), "--out", str(paths["split"]),
            "--held-out-groups", "2", "--held-in-groups", "2")
    return paths


def _keep_groups(raw: Path, groups: int) -> None:
    """Trim the demo dataset to its first ``groups`` groups (fewer images = faster tests)."""
    import json
    import shutil

    folders = sorted(p for p in raw.iterdir() if p.is_dir())
    for folder in folders[groups:]:
        shutil.rmtree(folder)
    kept = {p.name for p in folders[:groups]}
    lines = (raw / "captions.jsonl").read_text().splitlines()
    (raw / "captions.jsonl").write_text(
        "".join(line + "\n" for line in lines if line and json.loads(line)["image"].split("/")[0] in kept))

