"""Baselines that need their own model (not the checkpoint's sampler): one module each, found by name.

A baseline module in this package is named after its method and defines

  NAME        the method name, the module's own name (``--baseline NAME``, ``evaluate.baselines``, the ``method`` column, metric keys)
  LABEL       its row label in the report
  GRID_LABEL  its short column label in the sample grids
  load(base, config) -> Baseline
              builds it on the shared base models (``easyref.base_models.BaseModels``: VAE, text encoders,
              schedules; on their device and dtype) from the ``EvaluateConfig``

and a ``Baseline`` is any callable ``(samples, store, config) -> list[PIL.Image]`` giving one image per sample,
generated with ``sample.seed``. Adding a baseline is adding one file here (and, if it has settings, a field of
``EvaluateConfig``). ``text`` (text-only SDXL) is built in: it runs on the checkpoint's own sampler.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from easyref.evaluate.config import TEXT, known_baselines

if TYPE_CHECKING:
    from PIL import Image

    from easyref.base_models import BaseModels
    from easyref.evaluate.config import EvaluateConfig
    from easyref.evaluate.samples import ImageStore, Sample


class Baseline(Protocol):
    """What ``load`` returns: one generated image per sample."""

    def __call__(self, samples: Sequence[Sample], store: ImageStore, config: EvaluateConfig) -> list[Image.Image]: ...


@cache
def modules() -> dict[str, ModuleType]:
    """``{NAME: module}`` of every baseline module of this package (imported here, on first use)."""
    found = {}
    for name in known_baselines():
        if name == TEXT:
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        if getattr(module, "NAME", None) != name or not hasattr(module, "load"):
            raise TypeError(f"{module.__name__}: a baseline module needs NAME = {name!r} and load(base, config)")
        found[name] = module
    return found


def baseline_names() -> tuple[str, ...]:
    """Every baseline ``evaluate`` knows: ``text`` and the modules of this package (none imported)."""
    return known_baselines()


def load_baseline(name: str, base: BaseModels, config: EvaluateConfig) -> Baseline:
    """The baseline ``name`` (a module of this package), built on the shared base models."""
    return modules()[name].load(base, config)


def labels() -> dict[str, tuple[str, str]]:
    """``{NAME: (LABEL, GRID_LABEL)}`` of the baseline modules."""
    return {name: (m.LABEL, m.GRID_LABEL) for name, m in modules().items()}
