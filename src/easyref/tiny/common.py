"""What every offline pretraining of a tiny part shares: its settings' common fields, its command-line flags and
the optimizer step with its progress bar."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config", bound="PretrainConfig")
POSITIVE = ("per_subject", "steps", "batch", "threads")


@dataclass(kw_only=True)
class PretrainConfig:
    """The settings every part's pretraining has (each part's subclass sets the defaults that made it)."""

    seed: int = 0
    """Seed of the random model the training starts from and of the training's own randomness."""
    data_seed: int = 1001
    """Seed of the pretraining images (:func:`easyref.tiny.data.draw`): never the demo's seed 0."""
    per_subject: int = 64
    """Images drawn per catalogue subject."""
    patterns: str = "one"
    """The subjects its data is drawn from (``easyref.data.demo.catalogue``): ``one`` = the 48-subject catalogue,
    ``all`` = every colour x shape x pattern (192; a quarter of ``per_subject`` then draws as many images)."""
    steps: int = 1500
    """Optimizer steps."""
    batch: int = 128
    """Samples per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    threads: int = 1
    """torch threads; fixed, so that the same command gives the same bytes."""


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[PretrainConfig]) -> None:
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


def warmed_adamw(params: list[Any], lr: float, warmup: int, weight_decay: float = 0.0, *, total: int = 0,
                 final: float = 1.0) -> tuple[Any, Any]:
    """AdamW with a linear warm-up over ``warmup`` steps; with ``total``, then a cosine decay that reaches
    ``final`` x ``lr`` at step ``total``."""
    import math

    import torch

    def factor(step: int) -> float:
        if step < warmup or total <= warmup:
            return min(1.0, (step + 1) / max(1, warmup))
        progress = min(1.0, (step - warmup) / (total - warmup))
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def take_step(loss: Any, opt: Any, schedule: Any, losses: list[float], bar: Any) -> None:
    """Backward, update, schedule; the loss recorded and shown on the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if schedule is not None:
        schedule.step()
    losses.append(float(loss.detach()))
    bar.set_postfix(loss=f"{losses[-1]:.4f}")


def matching_texts_loss(logits_per_image: Any, texts: list[str]) -> Any:
    """CLIP's symmetric InfoNCE over a batch's image-text logits, where every identical text in the batch counts as a
    match (the target spread evenly over them), not as a negative: images of one subject share a description."""
    import torch
    import torch.nn.functional as F

    same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
    target = same / same.sum(-1, keepdim=True)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


def last100(losses: list[float]) -> float:
    """Mean of the last 100 losses (of all, when fewer): the final loss a manifest records."""
    return sum(losses[-100:]) / len(losses[-100:])


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
