"""Write a training stage's loss curve from MLflow to CSV and PNG, for `dvc plots` (the trainer logs to MLflow only).

  python pipelines/loss_history.py outputs/runs/pretrain     # -> outputs/runs/pretrain/loss.csv (step,loss), loss.png

The CSV is for `dvc plots show/diff` (Vega-Lite: the HTML page loads the Vega scripts from a CDN); the PNG is the
same curve drawn here, so the plots page shows it without network access too.

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
    draw_curve(sorted(latest.items()), run_dir / "loss.png", f"{run_dir.name}: training loss")
    return out


def draw_curve(points: list[tuple[int, float]], path: Path, title: str) -> None:
    """A line chart of (step, value) as a PNG, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 720, 400, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((margin, 12), title, fill="black", font=font)
    left, top, right, bottom = margin, margin, width - 24, height - margin
    draw.line((left, bottom, right, bottom), fill="black")
    draw.line((left, top, left, bottom), fill="black")
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def at(x: float, y: float) -> tuple[float, float]:
            return left + (right - left) * (x - x0) / (x1 - x0), bottom - (bottom - top) * (y - y0) / (y1 - y0)

        if len(points) > 1:
            draw.line([at(x, y) for x, y in points], fill=(70, 110, 190), width=2)
        if len(points) <= 50:  # few points: mark each
            for x, y in points:
                cx, cy = at(x, y)
                draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(70, 110, 190))
        draw.text((4, top), f"{y1:.4g}", fill="black", font=font)
        draw.text((4, bottom - 10), f"{y0:.4g}", fill="black", font=font)
        draw.text((left, bottom + 6), str(x0), fill="black", font=font)
        draw.text((right - 30, bottom + 6), str(x1), fill="black", font=font)
    draw.text((width // 2 - 20, height - 20), "step", fill="black", font=font)
    image.save(path, format="PNG")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    for run_dir in args:
        print(f"wrote {write_loss_csv(Path(run_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
