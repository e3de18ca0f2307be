"""Fixtures of the component tests: a tiny workspace built once, kfp.local with the subprocess runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.testing import (
    TINY_TRAIN,
    build_workspace,
    built_once,
    component_env,
    easyref,
    mlflow_store,
    workspace_paths,
)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models, 12 demo groups, ingested and split (about 10 s quiet, 40 s loaded): once per test run."""
    return workspace_paths(built_once(tmp_path_factory, "component-workspace", build_workspace))


@pytest.fixture(scope="session")
def pretrained(workspace: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step pretraining checkpoint (trained on the demo folder with the plain CLI, not a component): once
    per test run."""
    import yaml

    def train(run: Path) -> None:
        params = run / "params.yaml"
        params.write_text(yaml.safe_dump({"train": TINY_TRAIN}))
        mlflow_store(run / "mlflow.db")  # the default tracking URI, sqlite:///mlflow.db, is in the cwd: run
        easyref("train", "--stage", "pretrain", "--params", str(params), "--base", str(workspace["models"]),
                "--data", str(workspace["raw"]), "--out", str(run), "--max-steps", "1", cwd=run)

    return built_once(tmp_path_factory, "component-pretrained", train) / "final"


@pytest.fixture()
def kfp_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """kfp.local in this interpreter's environment; MLflow goes to a per-test SQLite file. Returns the output root."""
    from kfp import local

    for key, value in component_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


def pytest_configure(config: pytest.Config) -> None:
    # kfp.local warns that the project image is not a plain Python image; the subprocess runner is meant here
    config.addinivalue_line("filterwarnings", "ignore:You may be attemping to run a task:RuntimeWarning")
