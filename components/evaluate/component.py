"""KFP component: evaluate a checkpoint on the test split's held-in and held-out sets (``easyref evaluate``)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    checkpoint: Input[Model],
    split: Input[Dataset],
    ingested: Input[Dataset],
    base_models: str,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
    split_name: str = "all",
    mlflow_tracking_uri: str = "",
    pipeline_run: str = "",
):
    """Generate every test sample and score CLIP-I / CLIP-T / DINO-I, the reference gain and the baselines.

    Args:
        checkpoint: The checkpoint to evaluate (the last finetuning stage's).
        split: The split component's folder.
        ingested: The ingest component's folder (the images the split's paths point to).
        base_models: Folder with ``sdxl/``, ``mllm/`` and the metric models ``clip/``, ``dino/``.
        config: The ``evaluate:`` section of params.yaml (steps, guidance, baselines, max_samples, ...); with
            ``dreambench.folder`` (a folder the task can read, e.g. on the shared volume) DreamBench is a third section.
        split_name: ``all`` (both sets of the split, one section each, as the DVC stage does), ``held_out`` (unseen
            groups only) or ``held_in`` (held-out targets of seen groups only).
        mlflow_tracking_uri: MLflow server (empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        pipeline_run: The pipeline execution's id (the pipeline passes its run id): the MLflow run nests under
            that execution's run. Empty = a top-level run.
        evaluation: The evaluation folder: ``metrics.json``, ``samples.parquet``, images, grids, ``report.html``.
        metrics: The summary metrics (``<section>/<method>.<metric>``, and ``<method>.<metric>`` for the primary,
            held-out section).
        report: The self-contained HTML report.
    """
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from components.params import write_section

    if split_name not in ("all", "held_out", "held_in"):
        raise ValueError(f"evaluate: split_name must be all, held_out or held_in, got {split_name!r}")
    split_path = split.path if split_name == "all" else os.path.join(split.path, f"{split_name}.parquet")
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if pipeline_run:
        os.environ["EASYREF_PIPELINE_RUN"] = pipeline_run  # read by easyref.runs in the subprocess
    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "evaluate", config)
        cmd = [sys.executable, "-m", "easyref.cli", "evaluate", "--checkpoint", checkpoint.path,
               "--split", split_path, "--images-root", ingested.path,
               "--base", base_models, "--out", evaluation.path, "--params", params]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    with open(os.path.join(evaluation.path, "metrics.json")) as fh:
        values = json.load(fh)
    for key, value in sorted(values.items()):
        # the summary means only (``method.metric``, ``section/method.metric``); intervals stay in metrics.json
        if key.count(".") == 1 and isinstance(value, int | float):
            metrics.log_metric(key, value)
    evaluation.metadata.update({"split": split_name})
    shutil.copyfile(os.path.join(evaluation.path, "report.html"), report.path)
