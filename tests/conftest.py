"""Shared fixtures: the tiny models are built once per test session (a few seconds) into a temp folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
    from easyref.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models") / "tiny", seed=0)


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
