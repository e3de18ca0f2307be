"""The package's import contracts ([tool.importlinter] in pyproject.toml): its layers hold and no package has an
import circle. A new circle (or an import reaching up a layer) fails here, not in review."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_logo=True, cache_dir=None))"


def lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the package in ``src`` with the contracts of ``cwd/pyproject.toml``."""
    path = os.pathsep.join([str(src), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    env = os.environ | {"PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_and_no_circles_contracts_hold():
    result = lint(ROOT / "src", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a circle inside a package: train.config <-> train.loop
        ("train/config.py", "from easyref.train import loop  # noqa", "No cycles are allowed in easyref.train."),
        # an import reaching up the layers (and closing a circle): the model writer importing training
        ("model.py", "from easyref.train import checkpoint  # noqa", "easyref.model -> easyref.train.checkpoint"),
    ],
)
def test_a_new_circle_or_upward_import_breaks_a_contract(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "src" / "easyref", tmp_path / "src" / "easyref", ignore=shutil.ignore_patterns("assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "src" / "easyref" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = lint(tmp_path / "src", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken in result.stdout and "BROKEN" in result.stdout, result.stdout
