"""KFP component: register the checkpoint in the MLflow registry and promote it (``easyref register``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(
    checkpoint: Input[Model],
    evaluation: Input[Dataset],
    base_models: str,
    summary: Output[Markdown],
    model_name: str = "easyref",
    promote: bool = True,
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
    mlflow_tracking_uri: str = "",
    pipeline_run: str = "",
    lock_dir: str = "",
) -> NamedTuple("Registration", challenger=str, champion=str):
    """Register the checkpoint as ``model_name@challenger`` and, with ``promote``, move ``@champion`` if the gate passes.

    Args:
        checkpoint: The evaluated checkpoint.
        evaluation: The evaluate component's folder (its ``metrics.json`` feeds the promotion gate).
        base_models: Base-model folder (sdxl/, mllm/), bundled with the model unless ``register.base_models`` names
            them by hub id and revision or URI.
        model_name: Registered model name.
        promote: Compare with ``@champion`` on the ``register.gate`` rules and move the alias if all pass.
        config: The ``register:`` section of params.yaml (gate rules, experiment, ...).
        mlflow_tracking_uri: MLflow server (empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        pipeline_run: The pipeline execution's id (the pipeline passes its run id): the MLflow run nests under
            that execution's run. Empty = a top-level run.
        lock_dir: Folder for the registry lock (``register.lock_dir``), overriding ``config``'s: on a cluster a
            folder of the shared volume, so that registrations from several pods are serialised. Empty = ``config``'s.
        summary: What happened, as Markdown.

    Returns:
        challenger: The version ``@challenger`` points to.
        champion: The version ``@champion`` points to afterwards ("" if none).
    """
    import os
    import subprocess
    import sys
    import tempfile
    from collections import namedtuple

    from components.params import write_section

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    if pipeline_run:
        os.environ["EASYREF_PIPELINE_RUN"] = pipeline_run  # read by easyref.runs in the subprocess
    if lock_dir:
        config = {**config, "lock_dir": lock_dir}
    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "register", config)
        cmd = [sys.executable, "-m", "easyref.cli", "register", "--checkpoint", checkpoint.path,
               "--metrics", os.path.join(evaluation.path, "metrics.json"), "--model-name", model_name,
               "--base", base_models, "--params", params]
        if promote:
            cmd.append("--promote")
        print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        print(done.stderr, end="", file=sys.stderr, flush=True)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    versions = {}
    for alias in ("challenger", "champion"):
        try:
            versions[alias] = str(client.get_model_version_by_alias(model_name, alias).version)
        except Exception:  # noqa: BLE001 - no such alias yet
            versions[alias] = ""
    with open(summary.path, "w") as fh:
        fh.write(f"## Registration of `{model_name}`\n\n- `@challenger` -> version {versions['challenger']}\n"
                 f"- `@champion` -> version {versions['champion'] or '(none)'}\n\n```\n{done.stdout}```\n")
    return namedtuple("Registration", ["challenger", "champion"])(versions["challenger"], versions["champion"])
