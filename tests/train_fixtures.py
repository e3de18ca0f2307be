"""Helpers for the adversarial training and generation tests: a small run folder and real `easyref` processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.conftest import SMALL_PIXELS, make_group

RESOLUTION = 32


def write_groups(root: Path, groups: int = 2, per_group: int = 3) -> Path:
    """A folder of groups in the `easyref demo-data` layout."""
    lines = []
    for g in range(groups):
        (root / f"group{g}").mkdir(parents=True)
        for i, image in enumerate(make_group(g, per_group)):
            image.save(root / f"group{g}" / f"{i:03d}.png")
            lines.append(json.dumps({"image": f"group{g}/{i:03d}.png", "caption": f"shape of group {g}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_params(path: Path, tiny_models: Path, data: Path) -> Path:
    params = {
        "model": {"num_tokens": 8, **SMALL_PIXELS},
        "train": {
            "base": str(tiny_models),
            "data": str(data),
            "resolution": RESOLUTION,
            "batch_size": 2,
            "preview_every": -1,
            "lora_rank": 4,
            "save_every": 1,
            "keep_last": 2,
        },
    }
    path.write_text(yaml.safe_dump(params))
    return path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def easyref_process(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """A real `python -m easyref.cli ...` process (single-threaded, no progress bars)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "easyref.cli", *args], cwd=cwd, env=env, text=True, **popen)


def easyref_run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = easyref_process(args, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def message_lines(stderr: str) -> list[str]:
    """The lines of a command's stderr that say something to the user, less the thread-count notice."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("[easyref] CPU threads")]


@contextmanager
def train_workspace(root: Path, tiny_models: Path) -> Iterator[Path]:
    """``root`` with two small groups, a ``params.yaml`` for the tiny models and, while open, this process's MLflow
    tracking URI on a fresh store there (restored on leaving)."""
    from components.testing import mlflow_store

    write_groups(root / "groups")
    write_params(root / "params.yaml", tiny_models, root / "groups")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_store(root / "mlflow.db")
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def train_args(work: Path, out: Path, *extra: str) -> list[str]:
    """``easyref train`` of stage 1 with the workspace's params into ``out``."""
    return ["train", "--stage", "pretrain", "--params", str(work / "params.yaml"), "--out", str(out), *extra]
