"""The evaluate component through kfp.local: the held-in and held-out sections (two samples each), two DDIM steps,
no baselines."""

import json
from pathlib import Path

from kfp import dsl

from components.evaluate.component import evaluate
from components.testing import TINY_EVALUATE


def test_evaluate_writes_metrics_and_report(kfp_local: Path, workspace: dict[str, Path], pretrained: Path) -> None:
    @dsl.pipeline(name="evaluate-test")
    def evaluate_test(checkpoint_uri: str, split_uri: str, ingested_uri: str, base_models: str) -> dsl.Dataset:
        checkpoint = dsl.importer(artifact_uri=checkpoint_uri, artifact_class=dsl.Model)
        split = dsl.importer(artifact_uri=split_uri, artifact_class=dsl.Dataset)
        ingested = dsl.importer(artifact_uri=ingested_uri, artifact_class=dsl.Dataset)
        task = evaluate(checkpoint=checkpoint.output, split=split.output, ingested=ingested.output,
                        base_models=base_models, config=TINY_EVALUATE)  # default: both sections, as the DVC stage
        return task.outputs["evaluation"]

    run = evaluate_test(checkpoint_uri=str(pretrained), split_uri=str(workspace["split"]),
                        ingested_uri=str(workspace["ingested"]), base_models=str(workspace["models"]))

    out = Path(run.output.path)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("easyref.clip_i", "easyref.clip_t", "easyref.dino_i"):
        assert -1.0 <= metrics[key] <= 1.0
        assert metrics[key] == metrics[f"held_out/{key}"] and -1.0 <= metrics[f"held_in/{key}"] <= 1.0
    assert metrics["held_in/num_samples"] == metrics["held_out/num_samples"] == 2
    assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    # the HTML and Metrics artifacts sit beside the evaluation folder in the task's output root
    task_root = out.parent
    assert (task_root / "report").read_text() == (out / "report.html").read_text()
    logged = json.loads((task_root / "executor_output.json").read_text())["artifacts"]["metrics"]["artifacts"][0]
    assert {"easyref.clip_i", "held_in/easyref.clip_i", "held_out/easyref.clip_i"} <= set(logged["metadata"])
