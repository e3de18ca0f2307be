"""Shared fixtures: the tiny models are built once per test run (a few seconds) into a temp folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist each worker gets its share of the cores, and the processes its tests start inherit it: without
# this every worker (and every torchrun child) would spin one OpenMP thread per core and they would all contend.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    from easyref.threads import available_cores

    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, available_cores() // _workers))

# Small reference images keep the tiny MLLM fast: 4-9 merged visual tokens per image.
SMALL_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 9 * 28 * 28, "dropped_image_size": 56}


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """``mlflow.set_tracking_uri`` is process-global and also exports ``MLFLOW_TRACKING_URI``; a test that points it
    at a server it then stops must not leak that URI into later tests (or into their subprocesses)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # forget the global URI (this also unsets the variable)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, written once per test run and shared by the xdist workers (tests only read them)."""
    from components.testing import built_once
    from easyref.tiny_models import write_tiny_models

    return (
        built_once(tmp_path_factory, "tiny-models", lambda folder: write_tiny_models(folder / "tiny", seed=0)) / "tiny"
    )


@pytest.fixture()
def model_config():
    from easyref.model import ModelConfig

    return ModelConfig(num_tokens=8, **SMALL_PIXELS)


def make_group(seed: int, count: int = 3, size: tuple[int, int] = (96, 80)):
    """``count`` distinct coloured-shape images; different seeds give visibly different groups."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colour = tuple(rng.randrange(256) for _ in range(3))
    images = []
    for _ in range(count):
        im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        ImageDraw.Draw(im).ellipse((x, y, x + size[0] // 2, y + size[1] // 2), fill=colour)
        images.append(im)
    return images


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the slow end-to-end tests first: with ``pytest -n 2`` (``make test``) the two workers then share the
    long tests early and the many short ones fill in behind them, instead of one long test ending the run alone.
    Slow tests get 1500 s instead of the 600 s default of ``pyproject.toml``."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:  # a slow end-to-end test shares the cores with the other worker: 600 s is not its limit
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(1500))
