"""Pretrain the tiny judges: a CLIP (contrastive image-text) and a DINOv2 (self-supervised, no labels).

The paper scores images with CLIP ViT-L/14 (CLIP-I, CLIP-T) and DINOv2-Small (DINO-I), models that know what
images show. Random tiny embedders score every image alike (~0.997), so the tiny profile trains its own:

* **CLIP** is trained as CLIP was (Radford et al. 2021): the symmetric InfoNCE loss between the image and text
  embeddings of a batch of (image, text) pairs. The text is the subject's description, the full caption or the
  demo-style caption (colour or pattern sometimes left out); identical texts in a batch count as matches.
* **DINOv2** is trained without labels, with SimCLR's objective (Chen et al. 2020): two random views of each image
  (crop, flip, quarter turns, brightness, blur) must find each other among the batch's views (NT-Xent on a
  projection head that is dropped afterwards). The CLS embedding after the final norm is what DINO-I reads.

:func:`check` measures, on held-back images (:data:`easyref.tiny.data.CHECK_SEED`), what a judge must be able to
do: same-subject pairs above other-subject pairs (ROC AUC) and, for CLIP, image -> description retrieval.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.tiny import assets
from easyref.tiny.common import (
    PretrainConfig,
    add_config_arguments,
    config_from_args,
    part_fingerprint,
    run_record,
)
from easyref.tiny.optim import matching_texts_loss, take_step, warmed_adamw

if TYPE_CHECKING:
    import torch

PARTS = ("clip", "dino", "ip_clip")
"""``ip_clip`` is a second CLIP (other seeds) whose vision tower becomes the IP-Adapter's image encoder, as
IP-Adapter-SDXL's OpenCLIP encoder is another model than the CLIP that judges."""


@dataclass(kw_only=True)
class JudgeConfig(PretrainConfig):
    """How a tiny judge is pretrained (:data:`DEFAULTS` made the packaged ones)."""

    warmup: int = 100
    """Steps of linear learning-rate warm-up."""
    temperature: float = 0.2
    """SimCLR's temperature (CLIP learns its own)."""


DEFAULTS = {
    "clip": JudgeConfig(per_subject=32, patterns="all", steps=3000),
    "dino": JudgeConfig(steps=2000, per_subject=16, patterns="all"),
    "ip_clip": JudgeConfig(seed=1, data_seed=2001, per_subject=32, patterns="all", steps=3000),
}


def _training_images(folder: Path, drawn: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The drawn images at the model's input side, ``(N, 3, S, S)`` in [0, 1], and its processor's mean and std
    (so that augmentations work on pixels and the model sees what its processor would give it)."""
    import numpy as np
    import torch

    from easyref.metrics import _load_image_processor

    processor = _load_image_processor(str(folder))
    side = processor.crop_size["height"]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    raw = torch.from_numpy(np.stack([np.asarray(d.image.convert("RGB").resize((side, side))) for d in drawn]))
    return raw.permute(0, 3, 1, 2).float() / 255.0, mean, std


def _optimizer(params: list[Any], config: JudgeConfig) -> tuple[Any, Any]:
    return warmed_adamw(params, config.lr, config.warmup, weight_decay=0.05)


def train_clip(folder: Path, config: JudgeConfig) -> list[float]:
    """Contrastive training of the CLIP in ``folder`` (written by ``build.write_clip``), in place.

    Each image's text is, with equal odds, its subject's description (``a striped blue circle``), its caption naming
    colour, pattern and shape, or its caption in the demo's style. Images of one subject share a description, so
    the loss counts every identical text in the batch as a match (a soft target spread over them), not as a
    negative. The images' pale backgrounds are tinted at random half the time, so background colour alone cannot
    identify an image.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPModel

    from easyref.tiny.data import describe, draw

    drawn = draw(config.data_seed, config.per_subject, patterns=config.patterns)
    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    images, mean, std = _training_images(folder, drawn)
    texts_of = [(describe(d.subject), d.full_caption, d.caption) for d in drawn]
    generator = torch.Generator().manual_seed(config.seed)
    opt, warm = _optimizer(list(model.parameters()), config)
    model.train()
    losses = []
    for _ in (bar := tqdm(range(config.steps), desc="clip", dynamic_ncols=True)):
        idx = torch.randperm(len(drawn), generator=generator)[: config.batch].tolist()
        kinds = torch.randint(0, 3, (len(idx),), generator=generator).tolist()
        texts = [texts_of[i][k] for i, k in zip(idx, kinds, strict=True)]
        batch = torch.stack([
            _tint_background(images[i], generator) if float(torch.rand(1, generator=generator)) < 0.5 else images[i]
            for i in idx
        ])
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = model(**tokens, pixel_values=(batch - mean) / std)
        take_step(matching_texts_loss(out.logits_per_image, texts), opt, warm, losses, bar)
    model.eval().save_pretrained(folder)
    return losses


def _tint_background(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``image`` (3, H, W) in [0, 1] with its pale pixels (unsaturated and bright: the demo's backgrounds) tinted by
    a random factor per channel; the saturated subject keeps its colour."""
    import torch

    high, low = image.amax(0), image.amin(0)
    pale = ((high - low) < 0.2 * high.clamp_min(1e-6)) & (high > 0.6)
    tint = 0.85 + 0.3 * torch.rand(3, 1, 1, generator=generator)
    return torch.where(pale, (image * tint).clamp(0, 1), image)


def _views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view per image of a ``(N, 3, S, S)`` batch in [0, 1]: crop, flip, quarter turn, brightness, blur,
    and a tint of the pale (unsaturated, bright) pixels: a colour jitter of the background, so that the pale
    backgrounds the demo's subjects stand on cannot tell two images apart."""
    import torch
    import torch.nn.functional as F

    n, _, side, _ = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        crop = int(side * (0.6 + 0.4 * float(torch.rand(1, generator=generator))))
        y, x = (int(v) for v in torch.randint(0, side - crop + 1, (2,), generator=generator))
        view = F.interpolate(images[i : i + 1, :, y : y + crop, x : x + crop], size=(side, side), mode="bilinear",
                             align_corners=False)[0]
        if float(torch.rand(1, generator=generator)) < 0.5:
            view = view.flip(-1)
        view = torch.rot90(view, int(torch.randint(0, 4, (1,), generator=generator)), dims=(1, 2))
        if float(torch.rand(1, generator=generator)) < 0.8:
            view = _tint_background(view, generator)
        view = view * (0.8 + 0.4 * float(torch.rand(1, generator=generator)))
        if float(torch.rand(1, generator=generator)) < 0.3:
            view = F.avg_pool2d(view[None], 3, stride=1, padding=1, count_include_pad=False)[0]
        out[i] = view.clamp(0, 1)
    return out


def train_dino(folder: Path, config: JudgeConfig) -> list[float]:
    """SimCLR training of the DINOv2 in ``folder`` (written by ``build.write_dino``), in place."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import Dinov2Model

    from easyref.tiny.data import draw

    drawn = draw(config.data_seed, config.per_subject, patterns=config.patterns)
    images, mean, std = _training_images(folder, drawn)
    model = Dinov2Model.from_pretrained(folder)
    width = model.config.hidden_size
    torch.manual_seed(config.seed)
    head = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width))
    generator = torch.Generator().manual_seed(config.seed)
    opt, warm = _optimizer(list(model.parameters()) + list(head.parameters()), config)
    model.train()
    losses = []
    for _ in (bar := tqdm(range(config.steps), desc="dino", dynamic_ncols=True)):
        batch = images[torch.randperm(len(images), generator=generator)[: config.batch]]
        views = torch.cat([_views(batch, generator), _views(batch, generator)])
        z = F.normalize(head(model(pixel_values=(views - mean) / std).pooler_output), dim=-1)
        logits = z @ z.T / config.temperature
        logits.fill_diagonal_(float("-inf"))
        n = len(batch)
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        loss = F.cross_entropy(logits, partner)
        take_step(loss, opt, warm, losses, bar)
    model.eval().save_pretrained(folder)
    return losses


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half (the Mann-Whitney U statistic)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(positive, negative).statistic) / (len(positive) * len(negative))


def pair_auc(embeddings: torch.Tensor, labels: list[Any]) -> float:
    """ROC AUC of cosine similarity separating same-label pairs from other-label pairs."""
    sims = (embeddings @ embeddings.T).tolist()
    same, other = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            (same if labels[i] == labels[j] else other).append(sims[i][j])
    return roc_auc(same, other)


def check(part: str, folder: Path, per_subject: int = 0, patterns: str | None = None) -> dict[str, float]:
    """What a judge can do on held-back images of the subjects it learnt (``patterns``, default: the packaged
    part's): ``auc`` (same subject vs other) and, for CLIP, ``retrieval_top1`` (the nearest of the subjects'
    descriptions names the image's colour and shape). ``per_subject`` 0 draws four images of each of 48 subjects,
    two of each of 192."""
    from easyref.data.demo import catalogue
    from easyref.metrics import ClipEmbedder, DinoEmbedder
    from easyref.tiny.data import CHECK_SEED, describe, draw

    patterns = patterns or DEFAULTS[part].patterns
    candidates = catalogue(patterns)
    drawn = draw(CHECK_SEED, per_subject or max(2, 192 // len(candidates)), patterns=patterns)
    images, subjects = [d.image for d in drawn], [d.subject for d in drawn]
    if part == "dino":
        return {"auc": pair_auc(DinoEmbedder.from_pretrained(str(folder)).embed_images(images), subjects)}
    clip = ClipEmbedder.from_pretrained(str(folder))
    embeddings = clip.embed_images(images)
    best = (embeddings @ clip.embed_texts([describe(s) for s in candidates]).T).argmax(-1).tolist()
    hits = [(candidates[b].colour, candidates[b].shape) == (s.colour, s.shape) for b, s in zip(best, subjects, strict=True)]
    return {"auc": pair_auc(embeddings, subjects), "retrieval_top1": sum(hits) / len(hits)}


def fingerprint() -> str:
    """sha256 of the code that shapes the judges: this module and what every part shares."""
    return part_fingerprint(__file__)


def pretrain_judge(part: str, out: Path, config: JudgeConfig) -> dict[str, Any]:
    """Write a random judge of the tiny architecture, train it, check it, and publish it to ``out``."""
    import torch

    from easyref.tiny import build

    torch.set_num_threads(config.threads)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / part
        if part == "dino":
            build.write_dino(folder, config.seed)
            losses = train_dino(folder, config)
        else:
            build.write_clip(folder, config.seed)
            losses = train_clip(folder, config)
        assets.forget_source_path(folder / "config.json")
        record = run_record(part, config, fingerprint(), losses, started)
        return assets.publish(folder, out, {**record, "check": check(part, folder, patterns=config.patterns)})



# -- command line -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, JudgeConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(DEFAULTS[args.part], args)
    out = args.out or assets.asset(args.part)
    manifest = pretrain_judge(args.part, out, config)
    print(f"pretrain-tiny {args.part}: wrote {out} in {manifest['seconds']} s; check {manifest['check']}")
    return 0
