"""Ingestion statistics (``stats.json``) and the group-size histogram image, both deterministic."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

EXACT_SIZES_UP_TO = 32  # beyond this largest group size, the histogram uses power-of-two bins


def ingest_stats(manifest: pd.DataFrame, rejected: pd.DataFrame) -> dict[str, Any]:
    """Counts per outcome, reason and source, and the distribution of images per group."""
    sizes = manifest.groupby("group").size()
    sources = sorted(set(manifest["source"]) | set(rejected["source"]))
    return {
        "rows": len(manifest) + len(rejected),
        "accepted": len(manifest),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(rejected["reason"]).items())),
        "groups": len(sizes),
        "images_per_group": {
            "mean": round(float(sizes.mean()), 4) if len(sizes) else 0.0,
            "median": float(sizes.median()) if len(sizes) else 0.0,
            "min": int(sizes.min()) if len(sizes) else 0,
            "max": int(sizes.max()) if len(sizes) else 0,
        },
        "group_size_histogram": [[label, n] for label, n in group_size_bins(sizes.tolist())],
        "sources": {
            source: {
                "accepted": int((manifest["source"] == source).sum()),
                "rejected": int((rejected["source"] == source).sum()),
            }
            for source in sources
        },
    }


def group_size_bins(sizes: list[int]) -> list[tuple[str, int]]:
    """(label, number of groups) per bin: one bin per size when groups are small, else power-of-two bins."""
    if not sizes:
        return []
    counts = Counter(sizes)
    largest = max(sizes)
    if largest <= EXACT_SIZES_UP_TO:
        return [(str(size), counts.get(size, 0)) for size in range(1, largest + 1)]
    bins = []
    low = 1
    while low <= largest:
        high = low if low <= 2 else 2 * low - 2
        label = str(low) if low == high else f"{low}-{high}"
        bins.append((label, sum(n for size, n in counts.items() if low <= size <= high)))
        low = high + 1
    return bins


def draw_histogram(bins: list[tuple[str, int]], path: str | Path, title: str) -> None:
    """A bar chart of ``bins`` as a PNG (drawn with PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 720, 400, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((margin, 12), title, fill="black", font=font)
    plot_w, plot_h = width - 2 * margin, height - 2 * margin - 16
    base_y = margin + 16 + plot_h
    draw.line((margin, base_y, width - margin, base_y), fill="black")
    top = max((n for _, n in bins), default=0) or 1
    slot = plot_w / max(1, len(bins))
    for i, (label, n) in enumerate(bins):
        x0 = margin + i * slot + slot * 0.15
        x1 = margin + (i + 1) * slot - slot * 0.15
        y0 = base_y - plot_h * n / top
        draw.rectangle((x0, y0, x1, base_y), fill=(70, 110, 190))
        draw.text((x0, y0 - 14), str(n), fill="black", font=font)
        draw.text((x0, base_y + 4), label, fill="black", font=font)
    draw.text((width // 2 - 40, height - 20), "images per group", fill="black", font=font)
    image.save(path, format="PNG")
