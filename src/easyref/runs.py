"""MLflow runs of the stages: one parent run per pipeline execution, each stage's run nested under it.

A pipeline execution is named by ``EASYREF_PIPELINE_RUN``: the KFP pipeline passes its run id
(``dsl.PIPELINE_JOB_ID_PLACEHOLDER``) to every component, ``make demo`` sets one for its ``dvc repro``, and anyone
can set it (``EASYREF_PIPELINE_RUN=my-run-1 dvc repro``). With it, a stage (pretrain, single_ref, multi_ref,
evaluate, register) finds the parent run tagged ``easyref.pipeline_run=<id>`` in the experiment
``EASYREF_PIPELINE_EXPERIMENT`` (default ``easyref-pipeline``), creates it if it is the first stage, and starts its
own run there, nested under it (MLflow shows nesting within one experiment only). The parent's status follows the
stages: RUNNING while one runs, FAILED when one failed, FINISHED when the last one finished. Without it, a stage's
run is a top-level run in the stage's own experiment (``easyref-train``, ``easyref-evaluate``, ``easyref-register``).

Every run is named ``<stage>-<short id>`` (the pipeline's id, or the run's own) and tagged
``mlflow.source.git.commit`` (``EASYREF_GIT_COMMIT`` if set, as in an image built with ``--build-arg
GIT_COMMIT=...``, else ``git rev-parse HEAD``) and ``easyref.stage``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

from easyref.errors import UserError

PIPELINE_RUN_ENV = "EASYREF_PIPELINE_RUN"
PIPELINE_EXPERIMENT_ENV = "EASYREF_PIPELINE_EXPERIMENT"
DEFAULT_PIPELINE_EXPERIMENT = "easyref-pipeline"
GIT_COMMIT_ENV = "EASYREF_GIT_COMMIT"
PIPELINE_TAG = "easyref.pipeline_run"
ROLE_TAG = "easyref.role"
STAGE_TAG = "easyref.stage"
GIT_TAG = "mlflow.source.git.commit"
PARENT_TAG = "mlflow.parentRunId"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """``$EASYREF_GIT_COMMIT``, else ``git rev-parse HEAD`` (in ``cwd``), else ``unknown``."""
    if os.environ.get(GIT_COMMIT_ENV, "").strip():
        return os.environ[GIT_COMMIT_ENV].strip()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def pipeline_run() -> str | None:
    """The pipeline execution this process belongs to (``$EASYREF_PIPELINE_RUN``), or None when run alone."""
    value = os.environ.get(PIPELINE_RUN_ENV, "").strip()
    if not value:
        return None
    if not _ID.match(value):
        raise UserError(
            f"{PIPELINE_RUN_ENV}={value!r}: expected letters, digits and . _ : - (at most 128), e.g. dvc-20260101-1200"
        )
    return value


def short_id(value: str) -> str:
    """A UUID's first 8 hex digits; any other id as it is (cut to 24 characters)."""
    try:
        return uuid.UUID(value).hex[:8]
    except ValueError:
        return value[:24]


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def parent_run(pipeline: str) -> str:
    """The id of the pipeline's parent run (created by the first stage that asks), marked RUNNING."""
    import mlflow

    client = _client()
    experiment = mlflow.set_experiment(os.environ.get(PIPELINE_EXPERIMENT_ENV) or DEFAULT_PIPELINE_EXPERIMENT)
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pipeline}' and tags.`{ROLE_TAG}` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        experiment.experiment_id,
        run_name=f"pipeline-{short_id(pipeline)}",
        tags={
            PIPELINE_TAG: pipeline,
            ROLE_TAG: "pipeline",
            GIT_TAG: git_commit(),
            "mlflow.note.content": f"EasyRef pipeline execution {pipeline}: one nested run per stage.",
        },
    )
    return run.info.run_id


def start_stage_run(stage: str, experiment: str, tags: dict[str, str] | None = None, run_id: str | None = None) -> Any:
    """Start (or, with ``run_id``, resume) the stage's MLflow run; nested under the pipeline's run when in one."""
    import mlflow

    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=tags or None)
        parent = run.data.tags.get(PARENT_TAG)
        if parent:
            _client().update_run(parent, status="RUNNING")
        return run
    tags = {**(tags or {}), STAGE_TAG: stage, GIT_TAG: git_commit()}
    pipeline = pipeline_run()
    if pipeline is not None:
        parent = parent_run(pipeline)  # also selects the pipeline's experiment
        return mlflow.start_run(
            run_name=f"{stage}-{short_id(pipeline)}", parent_run_id=parent, tags={**tags, PIPELINE_TAG: pipeline}
        )
    mlflow.set_experiment(experiment)
    run = mlflow.start_run(tags=tags)
    _client().update_run(run.info.run_id, name=f"{stage}-{run.info.run_id[:8]}")
    return run


def end_stage_run(status: str = "FINISHED") -> None:
    """End the active stage run; its pipeline's run (if any) takes the same status until the next stage starts."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    parent = mlflow.get_run(run.info.run_id).data.tags.get(PARENT_TAG)
    mlflow.end_run(status=status)
    if parent:
        _client().set_terminated(parent, status=status)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """:func:`start_stage_run` ... :func:`end_stage_run`, FAILED if the block raises."""
    run = start_stage_run(stage, experiment, tags)
    try:
        yield run
    except BaseException:
        end_stage_run("FAILED")
        raise
    end_stage_run("FINISHED")
