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
    sealed, actual = info.get("metrics_sha256"), sha256_file(metrics_file)
    if sealed != actual:
        record = metrics_file.parent / EVALUATION_FILE
        was = "records no metrics_sha256" if not sealed else f"sealed sha256 {str(sealed)[:12]}..."
        raise UserError(
            f"{metrics_file}: sha256 {actual[:12]}... is not what `easyref evaluate` wrote ({record} {was}): the "
            "metrics were edited or copied after evaluation; re-run `easyref evaluate` and register with its "
            "metrics.json"
        )
    return info


EVALUATE_STEP_TAG, CHECKPOINT_TAG, METRICS_TAG = "easyref.step", "easyref.checkpoint_sha256", "easyref.metrics_sha256"


def check_sealed_by_run(client: Any, sha: str, metrics_file: Path, rerun: str) -> None:
    """If the registry's tracking store holds `easyref evaluate` runs of checkpoint ``sha``, one of them must have
    recorded this metrics.json's digest (tag ``easyref.metrics_sha256``): evaluation.json edited to match an edited
    metrics.json is refused wherever the evaluation was logged to the same store. A store without such runs (the
    evaluation logged elsewhere) leaves the check to evaluation.json's seal. ``rerun`` ends the unreachable-store
    error."""
    digest = sha256_file(metrics_file)
    query = f"tags.`{EVALUATE_STEP_TAG}` = 'evaluate' and tags.`{CHECKPOINT_TAG}` = '{sha}'"
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=query) if experiments else []
    except Exception as exc:  # noqa: BLE001 - any transport or store error: nothing was changed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"cannot search the MLflow tracking store for the evaluation runs of checkpoint {sha[:12]}... ({first}); "
            f"nothing was changed; {rerun}"
        ) from exc
    recorded = {r.data.tags.get(METRICS_TAG) for r in runs}
    if runs and digest not in recorded:
        ids = ", ".join(r.info.run_id for r in runs[:3])
        raise UserError(
            f"{metrics_file}: sha256 {digest[:12]}... is not the digest any `easyref evaluate` run of this checkpoint "
            f"recorded (MLflow run(s) {ids}): the metrics were edited after evaluation; re-run `easyref evaluate` "
            "and register with its metrics.json"
        )


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
