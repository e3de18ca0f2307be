"""MLflow runs: one parent run per pipeline execution with the stages nested, named, tagged with the git commit;
a stage run alone is a top-level run of its own experiment. Real sqlite MLflow stores."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from easyref.errors import UserError
from easyref.runs import (
    DEFAULT_PIPELINE_EXPERIMENT,
    GIT_TAG,
    PARENT_TAG,
    PIPELINE_RUN_ENV,
    ROLE_TAG,
    git_commit,
    stage_run,
)
from tests.registry_helpers import make_checkpoints, sqlite_uri, write_metrics


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import mlflow

    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def _evaluation_folder(root: Path) -> Path:
    """What log_to_mlflow uploads, as `easyref evaluate` leaves it."""
    root.mkdir(parents=True)
    (root / "grids").mkdir()
    for name in ("metrics.json", "headline.json", "evaluation.json"):
        (root / name).write_text("{}")
    (root / "samples.csv").write_text("sample_id\n")
    (root / "report.html").write_text("<html></html>")
    return root


def _runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


@pytest.mark.slow
def test_one_pipeline_execution_is_one_parent_run_with_every_stage_nested(store, tiny_models, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.outputs import log_to_mlflow
    from easyref.registry import RegisterConfig, register
    from easyref.train.tracking import MlflowTracker

    execution = str(uuid.uuid4())  # what dsl.PIPELINE_JOB_ID_PLACEHOLDER becomes
    monkeypatch.setenv(PIPELINE_RUN_ENV, execution)
    for stage in ("pretrain", "single_ref", "multi_ref"):  # the training stages, as rank 0 of `easyref train` runs them
        tracker = MlflowTracker("easyref-train", stage, {"lr": 1e-4}, {"stage": stage})
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.finish()
    log_to_mlflow(_evaluation_folder(tmp_path / "eval"), {"easyref.clip_i": 0.8}, EvaluateConfig(), {}, store)
    checkpoint = make_checkpoints(tiny_models, tmp_path / "ckpts", count=1)[0]
    register(
        checkpoint,
        write_metrics(tmp_path / "m/metrics.json", checkpoint),
        RegisterConfig(model_name="demo"),
        base=tiny_models,
        tracking_uri=store,
    )

    runs = _runs(store, DEFAULT_PIPELINE_EXPERIMENT)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "pipeline"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.run_name == f"pipeline-{execution[:8]}" and parent.info.status == "FINISHED"
    assert parent.data.tags[GIT_TAG] == git_commit()
    children = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id}
    stages = ("pretrain", "single_ref", "multi_ref", "evaluate", "register")
    assert set(children) == {f"{s}-{execution[:8]}" for s in stages}
    for child in children.values():
        assert child.info.status == "FINISHED" and child.data.tags[GIT_TAG] == git_commit()
    assert not _runs(store, "easyref-train") and not _runs(store, "easyref-evaluate")  # nothing outside the tree
    assert "EasyRef" in MlflowClient(store).get_registered_model("demo").description


def test_a_stage_run_alone_is_a_top_level_run_of_its_own_experiment(store, tmp_path):
    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.outputs import log_to_mlflow

    run_id = log_to_mlflow(_evaluation_folder(tmp_path / "eval"), {"x.y": 1.0}, EvaluateConfig(), {}, store)
    (run,) = _runs(store, "easyref-evaluate")
    assert run.info.run_id == run_id and run.info.run_name == f"evaluate-{run_id[:8]}"
    assert PARENT_TAG not in run.data.tags and run.data.tags[GIT_TAG] == git_commit()
    assert not _runs(store, DEFAULT_PIPELINE_EXPERIMENT)


def test_a_failed_stage_fails_the_pipeline_run_until_a_stage_runs_again(store, monkeypatch):
    monkeypatch.setenv(PIPELINE_RUN_ENV, "dvc-20260101-120000")
    with pytest.raises(RuntimeError), stage_run("evaluate", "easyref-evaluate"):
        raise RuntimeError("out of memory")
    (parent,) = [r for r in _runs(store, DEFAULT_PIPELINE_EXPERIMENT) if r.data.tags.get(ROLE_TAG) == "pipeline"]
    assert parent.info.status == "FAILED" and parent.info.run_name == "pipeline-dvc-20260101-120000"
    with stage_run("evaluate", "easyref-evaluate") as run:  # the retry
        from mlflow import MlflowClient

        assert MlflowClient(store).get_run(parent.info.run_id).info.status == "RUNNING"
        assert run.data.tags[PARENT_TAG] == parent.info.run_id
    assert MlflowClient(store).get_run(parent.info.run_id).info.status == "FINISHED"
    assert len(_runs(store, DEFAULT_PIPELINE_EXPERIMENT)) == 3  # one parent, the failed try, the retry


def test_a_malformed_pipeline_id_is_a_user_error(store, monkeypatch):
    monkeypatch.setenv(PIPELINE_RUN_ENV, "x' or '1'='1")
    with pytest.raises(UserError, match=PIPELINE_RUN_ENV):
        stage_run("evaluate", "easyref-evaluate").__enter__()


def test_the_git_commit_of_an_image_comes_from_its_build_argument(monkeypatch, tmp_path):
    monkeypatch.setenv("EASYREF_GIT_COMMIT", "0123abcd" * 5)
    assert git_commit(tmp_path) == "0123abcd" * 5
    monkeypatch.delenv("EASYREF_GIT_COMMIT")
    assert git_commit(tmp_path) == "unknown"  # not a git checkout, no build argument
    assert json.dumps(git_commit()) != '"unknown"'  # this repository's checkout


def test_make_demo_gives_its_dvc_repro_one_pipeline_execution_id() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert f'{PIPELINE_RUN_ENV}="$${{{PIPELINE_RUN_ENV}:-dvc-$$(date' in demo and "dvc repro" in demo
