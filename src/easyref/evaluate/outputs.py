"""Outputs of an evaluation: images, grids, the per-sample table, metrics.json, evaluation.json, report.html, and
one MLflow run with all of it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.evaluate.report import make_grid, render_report
from easyref.evaluate.scoring import flat_metrics

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.samples import ImageStore, Sample
    from easyref.metrics import Summary


def write_outputs(
    out: Path,
    samples: Sequence[Sample],
    generated: dict[str, list[Image.Image]],
    table: pd.DataFrame,
    summary: dict[str, dict[str, Summary]],
    info: dict[str, Any],
    store: ImageStore,
    config: EvaluateConfig,
    seconds_per_group: dict[str, float] | None = None,
) -> dict[str, float]:
    """Images, grids, per-sample table, metrics.json, evaluation.json and report.html under ``out``."""
    from easyref.data.parquet import write_json

    for method, images in generated.items():
        folder = out / "images" / method
        folder.mkdir(parents=True, exist_ok=True)
        for sample, image in zip(samples, images, strict=True):
            image.save(folder / f"{sample.slug}.png")
    table = table.copy()
    slugs = {s.sample_id: s.slug for s in samples}
    table["image"] = [
        f"images/{m}/{slugs[sid]}.png" for m, sid in zip(table["method"], table["sample_id"], strict=True)
    ]
    table.to_parquet(out / "samples.parquet", index=False)
    table.to_csv(out / "samples.csv", index=False)

    grids = []
    (out / "grids").mkdir(exist_ok=True)
    for i, sample in enumerate(samples[: config.report_samples]):
        grid = make_grid(
            store.group(sample.references), store(sample.targets[0]), {m: images[i] for m, images in generated.items()}
        )
        grid.save(out / "grids" / f"{sample.slug}.png")
        grids.append((sample.sample_id, sample.caption, grid))

    metrics = flat_metrics(summary, len(samples))
    write_json(metrics, out / "metrics.json")
    write_json(info, out / "evaluation.json")
    (out / "report.html").write_text(render_report(summary, info, grids, config.confidence, seconds_per_group))
    return metrics


def log_to_mlflow(
    out: Path, metrics: dict[str, float | None], config: EvaluateConfig, info: dict[str, Any], tracking_uri: str | None
) -> str:
    """One MLflow run with the config as params, the flat metrics and the outputs as artifacts; its id."""
    import mlflow

    from easyref.config import flatten, to_dict
    from easyref.registry import resolve_tracking_uri
    from easyref.runs import stage_run

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    params = {f"evaluate.{k}": str(v)[:500] for k, v in flatten(to_dict(config)).items()}
    params.update(
        {
            k: str(v)[:500]
            for k, v in info.items()
            if k in ("checkpoint_sha256", "split_sha256", "split", "checkpoint") or k.startswith("model.")
        }
    )
    tags = {
        "easyref.step": "evaluate",
        **{f"easyref.{k}": str(v) for k, v in info.items() if k.endswith("sha256") or k == "git_commit"},
    }
    with stage_run("evaluate", config.experiment, tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
        for name in ("metrics.json", "evaluation.json", "samples.csv", "report.html"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_artifacts(str(out / "grids"), artifact_path="grids")
        return run.info.run_id
