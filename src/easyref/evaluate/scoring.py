"""Scoring: one row per (method, sample) with CLIP-I, CLIP-T, DINO-I and Colour, then means with intervals per
method (and per caption subset), and the flat form DVC and MLflow take."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.evaluate.config import METRICS, EvaluateConfig
from easyref.evaluate.reference_gain import BAND_PREFIX
from easyref.stats import Summary, mean_ci

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from easyref.evaluate.samples import ImageStore, Sample
    from easyref.metrics import ClipEmbedder, DinoEmbedder


def load_embedders(config: EvaluateConfig, device: str) -> tuple[ClipEmbedder, DinoEmbedder]:
    """The metrics' CLIP and DINO models (loaded once per evaluation, used for every section)."""
    from easyref.metrics import ClipEmbedder, DinoEmbedder

    m = config.metrics
    clip = ClipEmbedder.from_pretrained(m.clip, batch_size=m.batch_size, device=device)
    return clip, DinoEmbedder.from_pretrained(m.dino, batch_size=m.batch_size, device=device)


def score(
    samples: Sequence[Sample],
    generated: dict[str, list[Image.Image]],
    store: ImageStore,
    config: EvaluateConfig,
    cache_file: Path | None,
    device: str,
    embedders: tuple[ClipEmbedder, DinoEmbedder] | None = None,
) -> pd.DataFrame:
    """One row per (method, sample) with CLIP-I, CLIP-T, DINO-I and colour (image metrics averaged over the
    targets); ``embedders`` from :func:`load_embedders` (loaded here when not given)."""
    import pandas as pd
    import torch

    from easyref.metrics import EmbeddingCache, colour_similarity, cosine, named_colour

    clip, dino = embedders or load_embedders(config, device)
    cache = EmbeddingCache(cache_file)
    targets = sorted({t for s in samples for t in s.targets})
    index = {t: i for i, t in enumerate(targets)}
    target_emb = {e.name: cache.embed_files(e, targets, store) for e in (clip, dino)}
    cache.save()
    captions = clip.embed_texts([s.caption for s in samples])
    palette = {name: tuple(rgb) for name, rgb in config.palette.items()}
    grounds = [tuple(rgb) for rgb in config.palette_backgrounds]
    target_colour = {t: named_colour(store(t), palette, grounds) for t in targets} if palette else {}
    rows = []
    for method, images in generated.items():
        gen = {e.name: e.embed_images(images) for e in (clip, dino)}
        clip_t = cosine(gen["clip"], captions)
        for i, sample in enumerate(samples):
            t_idx = [index[t] for t in sample.targets]
            row: dict[str, Any] = {
                "method": method,
                "sample_id": sample.sample_id,
                "group": sample.group,
                "caption": sample.caption,
                "draw": sample.draw,
                "seed": sample.seed,
            }
            for name, key in (("clip", "clip_i"), ("dino", "dino_i")):
                g = gen[name][i : i + 1].expand(len(t_idx), -1)
                row[key] = float(cosine(g, target_emb[name][torch.tensor(t_idx)]).mean())
            row["clip_t"] = float(clip_t[i])
            row["colour"] = sum(colour_similarity(images[i], store(t)) for t in sample.targets) / len(sample.targets)
            if palette:
                drawn = named_colour(images[i], palette, grounds)
                row["colour_match"] = sum(drawn is not None and drawn == target_colour[t]
                                          for t in sample.targets) / len(sample.targets)
            rows.append(row)
    return pd.DataFrame(rows)


def per_sample(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, sample): the mean of each metric over the sample's draws (``evaluate.images_per_sample``;
    missing values skipped, so the reference gain, measured on the first draw only, stays the sample's). Means and
    intervals are taken over samples, not images: a sample's draws share its target and are not independent."""
    keys = ["method", "sample_id", "group", "caption"]
    if "draw" not in table.columns or table["draw"].max() == 0:
        return table
    numeric = [c for c in table.select_dtypes("number").columns if c not in ("draw", "seed")]
    return table.groupby(keys, sort=False, dropna=False)[numeric].mean().reset_index()


def summarize(
    table: pd.DataFrame, confidence: float, subsets: dict[str, list[str]] | None = None
) -> dict[str, dict[str, Summary]]:
    """``{method: {metric: Summary}}`` over the samples of each method, then ``{"SUBSET/method": ...}`` over the
    samples whose caption contains none of the words of each of ``subsets``."""
    gains = [c for c in table.columns if c.startswith("reference_gain")]  # the gain and its noise bands
    columns = [c for c in (*METRICS, "loss_own", "loss_other") if c in table.columns] + gains
    out: dict[str, dict[str, Summary]] = {}
    sections = [("", table)]
    for name, words in (subsets or {}).items():
        sections.append((f"{name}/", table[[not caption_mentions(c, words) for c in table["caption"]]]))
    for prefix, frame in sections:
        for method, rows in frame.groupby("method", sort=False):
            summaries = {c: mean_ci(rows[c].tolist(), confidence) for c in columns if rows[c].notna().any()}
            # a noise band that fewer than 2 samples drew a timestep in has no interval: left out, not a null
            out[f"{prefix}{method}"] = {
                c: s for c, s in summaries.items() if not (c.startswith(BAND_PREFIX) and s.count < 2)
            }
    return out


def caption_mentions(caption: str, words: Sequence[str]) -> bool:
    """Whether ``caption`` contains any of ``words`` as a whole word (case-insensitive)."""
    tokens = set(re.findall(r"[\w-]+", caption.lower()))
    return any(w.lower() in tokens for w in words)


def flat_metrics(summary: dict[str, dict[str, Summary]], num_samples: int) -> dict[str, float]:
    """``{"easyref.clip_i": .., "easyref.clip_i.ci_low": .., ...}``: the flat form DVC and MLflow take."""
    flat: dict[str, float] = {"num_samples": float(num_samples)}
    for method, metrics in summary.items():
        for name, s in metrics.items():
            flat[f"{method}.{name}"] = s.mean
            flat[f"{method}.{name}.ci_low"] = s.low
            flat[f"{method}.{name}.ci_high"] = s.high
    return {k: (None if v != v else round(v, 6)) for k, v in flat.items()}  # NaN -> null in JSON
