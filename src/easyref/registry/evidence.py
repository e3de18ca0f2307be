"""What a registration rests on: the checkpoint's hash, the evaluation that measured it, and where both came from."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from easyref.data.parquet import sha256_file
from easyref.errors import UserError
from easyref.registry.config import DEFAULT_TRACKING_URI, GateRule
from easyref.runs import git_commit

EVALUATION_FILE = "evaluation.json"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``$MLFLOW_TRACKING_URI``, else the embedded default ``sqlite:///mlflow.db``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """SHA-256 over the checkpoint folder's files (relative names and content hashes, sorted)."""
    root = Path(checkpoint)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read {what} ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc


def read_metrics(path: Path) -> dict[str, float]:
    """The numeric entries of a flat metrics.json; nulls are dropped, non-finite numbers are refused."""
    if not path.is_file():
        raise UserError(f"{path}: no such metrics file (written by `easyref evaluate --out DIR` as DIR/metrics.json)")
    data = _load_json(path, "the metrics")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of metric name -> number")
    metrics = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise UserError(f"{path}: key {key!r} is nested; expected flat keys such as 'easyref.clip_i'")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{path}: {key} = {value} is not a finite number; re-run `easyref evaluate`")
            metrics[key] = float(value)
    return metrics


def require_gate_metrics(path: Path, metrics: dict[str, float], rules: list[GateRule]) -> None:
    """Every metric a gate rule reads must be in metrics.json as a finite number (else nothing can be promoted)."""
    missing = sorted({r.metric for r in rules} - set(metrics))
    if missing:
        raise UserError(
            f"{path}: gate metric(s) {', '.join(missing)} missing or null; re-run `easyref evaluate` with them "
            "enabled, or drop the rule from register.gate"
        )


def evaluated_checkpoint(metrics_file: Path) -> dict[str, Any]:
    """The evaluation's provenance (``evaluation.json`` beside metrics.json), which names the checkpoint's hash."""
    path = metrics_file.parent / EVALUATION_FILE
    if not path.is_file():
        raise UserError(
            f"{path}: missing; `easyref evaluate` writes it beside metrics.json with the evaluated checkpoint's "
            "sha256, and only an evaluated checkpoint can be registered"
        )
    info = _load_json(path, "the evaluation record")
    if not isinstance(info, dict) or not isinstance(info.get("checkpoint_sha256"), str):
        raise UserError(f"{path}: no 'checkpoint_sha256' recorded; re-run `easyref evaluate` on the checkpoint")
    return info


def verify_evaluated(checkpoint: Path, sha: str, metrics_file: Path) -> dict[str, Any]:
    """Refuse unless ``metrics_file`` is the evaluation of exactly this checkpoint (same content hash)."""
    info = evaluated_checkpoint(metrics_file)
    if info["checkpoint_sha256"] != sha:
        raise UserError(
            f"{metrics_file}: measures checkpoint {info.get('checkpoint', '?')} with sha256 "
            f"{info['checkpoint_sha256'][:12]}..., but {checkpoint} has sha256 {sha[:12]}...; evaluate this "
            "checkpoint (`easyref evaluate --checkpoint ...`) and register it with that metrics.json"
        )
    return info


def provenance(checkpoint: Path, evaluation: dict[str, Any], params_file: Path | None) -> dict[str, str]:
    """Version tags that say where the model came from."""
    from easyref.model import read_checkpoint_config

    record = read_checkpoint_config(checkpoint)
    tags = {"git_commit": git_commit(), "checkpoint_parts": ",".join(record.parts)}
    for key, value in record.extra.items():
        if "sha256" in key or "hash" in key or key in ("stage", "step"):
            tags[f"train.{key}"] = str(value)
    for key in ("split_sha256", "split", "dreambench", "checkpoint_sha256"):
        if key in evaluation:
            tags[f"eval.{key}"] = str(evaluation[key])
    if params_file is not None and params_file.is_file():
        tags["params_sha256"] = sha256_file(params_file)
    return tags
