"""Demo-style pretraining data for the tiny parts, drawn with other seeds than the demo's.

The demo trains and evaluates EasyRef on ``easyref demo-data --seed 0``. The tiny parts see the same catalogue of
subjects (every colour x shape, each with its pattern), as a real pretrained model has seen the world's colours and
shapes, but never one of the demo's images: their data comes from :data:`PRETRAIN_SEEDS`, drawn by the demo's own
drawing code. Each :class:`Drawn` keeps its subject, so a part's check can ask what the part knows about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from easyref.data.demo import Subject

PRETRAIN_SEEDS = range(1000, 1_000_000)
"""Seeds of pretraining images; the demo uses seed 0 and its tests small seeds."""
CHECK_SEED = 7
"""Seed of the held-back images every part's check is measured on (neither the demo's nor a pretraining seed)."""


@dataclass(frozen=True)
class Drawn:
    image: Image.Image
    subject: Subject
    caption: str
    """The demo's caption style: colour or pattern sometimes left out."""
    full_caption: str
    """The same caption naming colour, pattern and shape."""


def draw(seed: int, per_subject: int, size: int = 128, patterns: str = "one") -> list[Drawn]:
    """``per_subject`` images of every subject of ``catalogue(patterns)``, from ``seed`` (the same seed gives the
    same images)."""
    import numpy as np

    from easyref.data.demo import catalogue, draw_image

    if seed == 0:
        raise ValueError("seed 0 is the demo's own data; pretraining and checks draw with other seeds")
    drawn = []
    for index, subject in enumerate(catalogue(patterns)):
        for i in range(per_subject):
            state = [seed, index, i]
            image, caption = draw_image(subject, np.random.default_rng(state), size)
            _, full = draw_image(subject, np.random.default_rng(state), size, full_caption=True)
            drawn.append(Drawn(image, subject, caption, full))
    return drawn


def describe(subject: Subject) -> str:
    """The short answer the MLLM learns to give and the text the CLIP check retrieves: ``a striped blue circle``."""
    return f"a {subject.describe()}"
