"""Outputs of an evaluation: images, grids, the per-sample table, metrics.json, headline.json, evaluation.json,
report.html, and one MLflow run with all of it.

metrics.json is the full flat table (every section x method x metric x statistic, for tools and the gate);
headline.json is its compact form for ``dvc metrics show`` / ``dvc exp show``: per section and Table-3 method the
means of CLIP-I, CLIP-T, DINO-I and EasyRef's reference gain. evaluation.json seals the evaluation: beside the
checkpoint's sha256 it records metrics.json's and samples.parquet's (``metrics_sha256``, ``samples_sha256``), and so
does the MLflow run's tags; ``easyref register`` refuses a metrics.json whose digest differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.evaluate.config import HEADLINE_METHODS
from easyref.evaluate.report import ReportSection, make_grid, render_report
from easyref.evaluate.scoring import flat_metrics
from easyref.evaluate.sections import SectionRun, combine

if TYPE_CHECKING:
    import pandas as pd

    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.samples import ImageStore
    from easyref.stats import Summary

HEADLINE_FILE = "headline.json"
HEADLINE_METRICS = ("clip_i", "clip_t", "dino_i", "reference_gain")


def headline(metrics: dict[str, float | None], sections: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{section: {method: {metric: mean}}}`` of the Table-3 methods (the compact file DVC shows); absent and null
    values are left out."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for section in sections:
        for method in HEADLINE_METHODS:
            values = {m: metrics.get(f"{section}/{method}.{m}") for m in HEADLINE_METRICS}
            kept = {m: v for m, v in values.items() if v is not None}
            if kept:
                out.setdefault(section, {})[method] = kept
    return out


def write_outputs(
    out: Path,
    runs: Sequence[SectionRun],
    tables: dict[str, pd.DataFrame],
    summaries: dict[str, dict[str, dict[str, Summary]]],
    info: dict[str, Any],
    store: ImageStore,
    config: EvaluateConfig,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Images, grids, per-sample table, metrics.json, headline.json, evaluation.json and report.html under ``out``,
    one section per evaluated set (images and grids under ``<section>/``; metric keys prefixed ``<section>/``, the
    primary section's also unprefixed). Returns the flat metrics and ``info`` with the digests evaluation.json
    seals (``metrics_sha256``, ``samples_sha256``)."""
    import pandas as pd

    from easyref.data.parquet import sha256_file, write_json

    frames, sections = [], []
    for run in runs:
        samples = run.section.samples
        for method, images in run.generated.items():
            folder = out / "images" / run.name / method
            folder.mkdir(parents=True, exist_ok=True)
            for sample, image in zip(samples, images, strict=True):
                image.save(folder / f"{sample.slug}.png")
        slugs = {(s.sample_id, s.draw): s.slug for s in samples}
        table = tables[run.name].assign(section=run.name)
        table["image"] = [
            f"images/{run.name}/{m}/{slugs[sid, draw]}.png"
            for m, sid, draw in zip(table["method"], table["sample_id"], table["draw"], strict=True)
        ]
        frames.append(table)
        grids = []
        (out / "grids" / run.name).mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(samples[: min(config.report_samples, len(run.section.first_draws))]):
            images = {m: generated[i] for m, generated in run.generated.items()}
            grid = make_grid(store.group(sample.references), store(sample.targets[0]), images)
            grid.save(out / "grids" / run.name / f"{sample.slug}.png")
            grids.append((sample.sample_id, sample.caption, grid))
        sections.append(ReportSection(run.name, run.section.title, summaries[run.name], grids, run.per_group()))
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "section", table.pop("section"))
    table.to_parquet(out / "samples.parquet", index=False)
    table.to_csv(out / "samples.csv", index=False)

    flat = {run.name: flat_metrics(summaries[run.name], len(run.section.first_draws)) for run in runs}
    metrics = combine(flat, info["primary_section"])
    write_json(metrics, out / "metrics.json")
    write_json(headline(metrics, [run.name for run in runs]), out / HEADLINE_FILE)
    sealed = {
        "metrics_sha256": sha256_file(out / "metrics.json"),
        "samples_sha256": sha256_file(out / "samples.parquet"),
    }
    info = {**info, **sealed}
    write_json(info, out / "evaluation.json")
    (out / "report.html").write_text(render_report(sections, info, config.confidence))
    return metrics, info


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
            if k.rpartition("/")[2] in ("checkpoint_sha256", "split_sha256", "split", "checkpoint", "dreambench")
            or k.startswith("model.")
            or k in ("sections", "primary_section")
        }
    )
    tags = {
        "easyref.step": "evaluate",
        **{f"easyref.{k}": str(v) for k, v in info.items() if k.endswith("sha256") or k == "git_commit"},
    }
    with stage_run("evaluate", config.experiment, tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
        for name in ("metrics.json", HEADLINE_FILE, "evaluation.json", "samples.csv", "report.html"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_artifacts(str(out / "grids"), artifact_path="grids")
        return run.info.run_id
