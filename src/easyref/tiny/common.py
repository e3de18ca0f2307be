"""What every offline pretraining of a tiny part shares around its training: its settings' common fields, its
command-line flags, its manifest's record and the fingerprint of the code that shapes it. The training steps they
share are :mod:`easyref.tiny.optim`."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config", bound="RunConfig")
POSITIVE = ("per_subject", "steps", "batch", "threads")


@dataclass(kw_only=True)
class RunConfig:
    """The settings every offline pretraining run has: its seeds, the demo-style data it draws and its threads (each
    part's subclass sets the defaults that made it)."""

    seed: int = 0
    """Seed of the random model the training starts from and of the training's own randomness."""
    data_seed: int = 1001
    """Seed of the pretraining images (:func:`easyref.tiny.data.draw`): never the demo's seed 0."""
    per_subject: int = 64
    """Images drawn per catalogue subject."""
    patterns: str = "one"
    """The subjects its data is drawn from (``easyref.data.demo.catalogue``): ``one`` = the 48-subject catalogue,
    ``all`` = every colour x shape x pattern (192; a quarter of ``per_subject`` then draws as many images)."""
    threads: int = 1
    """torch threads; fixed, so that the same command gives the same bytes."""


@dataclass(kw_only=True)
class PretrainConfig(RunConfig):
    """A run with one optimizer: the settings of the judges', the MLLM's and the IP-Adapter's pretraining."""

    steps: int = 1500
    """Optimizer steps."""
    batch: int = 128
    """Samples per step."""
    lr: float = 1e-3
    """AdamW learning rate."""


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[RunConfig]) -> None:
    """``--out`` and one flag per int / float setting of ``config_class`` (default: the part's packaged value), and
    ``--patterns`` where it has that setting (the catalogue its data is drawn from)."""
    from easyref.data.demo import PATTERN_SETS

    parser.add_argument("--out", type=Path, default=None, help="where to write it (default: the packaged asset)")
    for field in fields(config_class):
        kind = {"int": int, "float": float}.get(str(field.type))
        if kind is not None:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                                help=f"(default: the packaged part's {field.name})")
        elif field.name == "patterns":
            parser.add_argument("--patterns", choices=PATTERN_SETS, default=None,
                                help="the subjects its data is drawn from: one = the 48-subject catalogue, all = "
                                "every colour x shape x pattern (default: the packaged part's)")


def config_from_args(defaults: Config, args: argparse.Namespace, minimum: dict[str, int] | None = None) -> Config:
    """``defaults`` with the flags given; a count below its least value (1 for :data:`POSITIVE`, or as ``minimum``
    says) is one line (exit 2)."""
    from easyref.errors import UserError

    given = {k: getattr(args, k) for k in asdict(defaults) if getattr(args, k, None) is not None}
    for name, least in (dict.fromkeys(POSITIVE, 1) | (minimum or {})).items():
        if given.get(name, least) < least:
            raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {given[name]}")
    return replace(defaults, **given)


def last100(losses: list[float]) -> float:
    """Mean of the last 100 losses (of all, when fewer): the final loss a manifest records."""
    return sum(losses[-100:]) / len(losses[-100:])


def part_fingerprint(*files: str) -> str:
    """sha256 of a part's own modules (``files``) and of the code every part's pretraining shares: the random tiny
    models it starts from (:mod:`easyref.tiny.build`), the demo's drawing (:mod:`easyref.data.demo`), the pretraining
    data (:mod:`easyref.tiny.data`) and the training steps (:mod:`easyref.tiny.optim`)."""
    from easyref.data import demo
    from easyref.tiny import assets, build, data, optim

    return assets.code_fingerprint([*files, build.__file__, demo.__file__, data.__file__, optim.__file__])


def run_record(part: str, config: PretrainConfig, code_sha256: str, losses: list[float], started: float,
               **extra: Any) -> dict[str, Any]:
    """The manifest fields every pretrained part records (``assets.publish`` adds the files' sha256);
    ``code_sha256`` is the part module's ``fingerprint()``."""
    import torch

    return {
        "part": part,
        "config": asdict(config),
        "code_sha256": code_sha256,
        "data": f"easyref.tiny.data.draw(seed={config.data_seed}, per_subject={config.per_subject}, "
                f"patterns={config.patterns!r})",
        **extra,
        "loss_last100": last100(losses),
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
