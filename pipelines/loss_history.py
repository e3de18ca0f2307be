"""Write a training stage's loss curve from MLflow to CSV, for `dvc plots` (the trainer logs to MLflow only).

  python pipelines/loss_history.py outputs/runs/pretrain     # -> outputs/runs/pretrain/loss.csv (step,loss)

The run is the one named by ``final/easyref_config.json`` (``extra.mlflow_run_id``); the tracking URI is
``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``, as for the trainer.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path


def write_loss_csv(run_dir: Path) -> Path:
    record = json.loads((run_dir / "final" / "easyref_config.json").read_text())
    run_id = (record.get("extra") or {}).get("mlflow_run_id")
    if not run_id:
        raise SystemExit(f"{run_dir}/final/easyref_config.json names no MLflow run (extra.mlflow_run_id)")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    latest = {m.step: m.value for m in history}  # a resumed run may log a step twice: keep the last value
    out = run_dir / "loss.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss"])
        writer.writerows([step, f"{value:.6f}"] for step, value in sorted(latest.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    for run_dir in args:
        print(f"wrote {write_loss_csv(Path(run_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
