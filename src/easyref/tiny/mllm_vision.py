"""The tiny MLLM's first stage: its vision tower learns to see, contrastively, before the language model reads it.

Qwen2-VL does not start its vision tower from nothing: its ViT is initialised from a CLIP-trained one (DFN) and
aligned to the language model afterwards. The tiny Qwen2-VL trained only on next-token loss learns colours and
patterns but not shapes (its captions named the shape 0.45 of the time, and that only through the catalogue's
pairing of pattern with shape: on subjects with random patterns it named 0.22, chance 0.17), while the same tower
trained on shapes directly tells them apart. So the tiny one gets the same first stage in kind: CLIP's symmetric
contrastive loss between the tower's image embedding (the mean of its merged tokens, projected) and the embedding
of the image's text by a small CLIP text tower trained alongside and then dropped, as the text side of DFN's CLIP
is not part of Qwen2-VL. The texts are the subject's description or the caption up to or with its background;
identical texts in a batch count as matches.

:func:`check` reports how often the description nearest to the tower's embedding of a held-back image, among those
of every subject it was trained on, names the image's shape (and its colour and shape).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.tiny.optim import matching_texts_loss, take_step, warmed_adamw

if TYPE_CHECKING:
    import torch

TEXT_TOWER_SEED_OFFSET = 11
"""The text tower's seed is the MLLM's seed plus this (it is another model than the judging CLIP)."""


class ContrastivePair:
    """The MLLM's vision tower with a projection, and a small CLIP text tower, in one joint embedding space."""

    def __init__(self, visual: Any, image_processor: Any, seed: int):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        from easyref.tiny import build

        with tempfile.TemporaryDirectory() as tmp:
            build.write_clip(Path(tmp), seed)
            clip = CLIPModel.from_pretrained(tmp)
            self.tokenizer = AutoTokenizer.from_pretrained(tmp)
        self.visual, self.image_processor = visual, image_processor
        self.text_model, self.text_projection = clip.text_model, clip.text_projection
        torch.manual_seed(seed)
        self.image_projection = torch.nn.Linear(visual.merger.mlp[-1].out_features,
                                                self.text_projection.out_features, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # CLIP's starting temperature, 1 / 0.07

    def parameters(self) -> list[torch.nn.Parameter]:
        modules = (self.visual, self.text_model, self.text_projection, self.image_projection)
        return [p for m in modules for p in m.parameters()] + [self.logit_scale]

    def embed_images(self, images: list[Any]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        vision = self.image_processor(images, return_tensors="pt")
        merged = self.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"]).pooler_output
        per_image = (vision["image_grid_thw"].prod(-1) // self.visual.spatial_merge_size**2).tolist()
        pooled = torch.stack([tokens.mean(0) for tokens in merged.split(per_image)])
        return F.normalize(self.image_projection(pooled), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        import torch.nn.functional as F

        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return F.normalize(self.text_projection(self.text_model(**tokens).pooler_output), dim=-1)

    def loss(self, images: list[Any], texts: list[str]) -> torch.Tensor:
        logits = self.logit_scale.exp().clamp(max=100) * self.embed_images(images) @ self.embed_texts(texts).T
        return matching_texts_loss(logits, texts)


def train_vision_tower(model: Any, image_processor: Any, drawn: list[Any], *, seed: int, steps: int, batch: int,
                       lr: float, warmup: int) -> tuple[list[float], ContrastivePair]:
    """Contrastive training of ``model``'s vision tower (a Qwen2-VL, in place) on ``steps`` batches of ``batch``
    (image, text) pairs; its losses and the trained pair."""
    import torch
    from tqdm.auto import tqdm

    from easyref.tiny.data import describe

    pair = ContrastivePair(model.model.visual, image_processor, seed + TEXT_TOWER_SEED_OFFSET)
    texts_of = [(describe(d.subject), d.full_caption.split(" on ")[0], d.full_caption) for d in drawn]
    generator = torch.Generator().manual_seed(seed)
    opt, warm = warmed_adamw(pair.parameters(), lr, warmup, weight_decay=0.05)
    losses: list[float] = []
    for _ in (bar := tqdm(range(steps), desc="mllm vision", dynamic_ncols=True)):
        picks = torch.randperm(len(drawn), generator=generator)[:batch].tolist()
        kinds = torch.randint(0, 3, (len(picks),), generator=generator).tolist()
        texts = [texts_of[i][k] for i, k in zip(picks, kinds, strict=True)]
        take_step(pair.loss([drawn[i].image for i in picks], texts), opt, warm, losses, bar)
    return losses, pair


def check(pair: ContrastivePair, per_subject: int = 0, patterns: str = "one") -> dict[str, float]:
    """On held-back images of ``patterns``' subjects: how often the nearest of those subjects' descriptions has the
    image's shape, and its colour and shape (``per_subject`` 0 draws 96 images whichever the subjects)."""
    import torch

    from easyref.data.demo import catalogue
    from easyref.tiny.data import CHECK_SEED, describe, draw

    subjects = catalogue(patterns)
    drawn = draw(CHECK_SEED, per_subject or max(1, 96 // len(subjects)), patterns=patterns)
    with torch.no_grad():
        images = torch.cat([pair.embed_images([d.image for d in drawn[i : i + 32]]) for i in range(0, len(drawn), 32)])
        best = (images @ pair.embed_texts([describe(s) for s in subjects]).T).argmax(-1).tolist()
    shape = [subjects[b].shape == d.subject.shape for b, d in zip(best, drawn, strict=True)]
    both = [(subjects[b].colour, subjects[b].shape) == (d.subject.colour, d.subject.shape)
            for b, d in zip(best, drawn, strict=True)]
    return {"shape_top1": sum(shape) / len(shape), "subject_top1": sum(both) / len(both)}
