"""Shared by the registry tests: tiny checkpoints, metrics.json + evaluation.json as `easyref evaluate` writes them."""

from __future__ import annotations

import json
from pathlib import Path

from components.testing import mlflow_store
from tests.conftest import SMALL_PIXELS

GOOD = {"easyref.clip_i": 0.80, "easyref.clip_t": 0.70, "easyref.dino_i": 0.60, "num_samples": 3}


def make_checkpoints(tiny_models: Path, root: Path, count: int = 3) -> list[Path]:
    """Checkpoints of the same tiny model that differ in their recorded step (so in their hash)."""
    import torch

    from easyref.model import ModelConfig, load_model

    torch.manual_seed(0)
    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", config=ModelConfig(num_tokens=8, **SMALL_PIXELS))
    return [model.save_checkpoint(root / f"ckpt{i}", ["reference", "adapter"], step=i) for i in range(count)]


def write_metrics(path: Path, checkpoint: Path, evaluation: dict | None = None, **changes: float) -> Path:
    """metrics.json and, beside it, the evaluation.json that `easyref evaluate` writes (naming the checkpoint)."""
    from easyref.registry import checkpoint_sha256

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**GOOD, **changes}))
    from easyref.data.parquet import sha256_file

    record = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_sha256(checkpoint),
        "metrics_sha256": sha256_file(path),  # the seal `easyref evaluate` writes
        **(evaluation or {}),
    }
    (path.parent / "evaluation.json").write_text(json.dumps(record))
    return path


def sqlite_uri(tmp_path: Path) -> str:
    """A new MLflow store in ``tmp_path`` (a copy of a migrated empty one: components.testing.mlflow_store)."""
    return mlflow_store(tmp_path / "mlflow.db")


def aliases(uri: str, name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient(uri).get_registered_model(name).aliases.items()}
