"""The training steps every offline pretraining of a tiny part shares: AdamW warmed up and decayed, one optimizer
step with its progress bar, and CLIP's contrastive loss over a batch where texts repeat. Part of every part's code
fingerprint (:func:`easyref.tiny.common.part_fingerprint`): an edit here is an edit of every pretrained part."""

from __future__ import annotations

from typing import Any


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
