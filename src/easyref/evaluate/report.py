"""The report: one grid image per sample (references | target | each method) and a self-contained HTML page
rendered from ``templates/report.html.j2`` (installed as package data)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from easyref.evaluate.config import METRIC_LABELS, METRICS, SWAPPED, TEXT

if TYPE_CHECKING:
    from PIL import Image

    from easyref.metrics import Summary


def method_labels() -> dict[str, str]:
    """Report row label of every method: the built-in ones and each baseline module's ``LABEL``."""
    from easyref.evaluate.baselines import labels

    builtin = {
        "easyref": "EasyRef (checkpoint)",
        SWAPPED: "EasyRef, another group's references",
        TEXT: "SDXL, text only",
    }
    return {**builtin, **{name: label for name, (label, _) in labels().items()}}


def grid_labels() -> dict[str, str]:
    """Short column label of every method in the grids."""
    from easyref.evaluate.baselines import labels

    return {SWAPPED: "swapped refs", TEXT: "text only", **{name: grid for name, (_, grid) in labels().items()}}


def _thumb(image: Image.Image, cell: int) -> Image.Image:
    from PIL import Image

    im = image.convert("RGB")
    if max(im.size) < cell:  # small generations (the tiny profile's 64 px) are enlarged, pixels kept sharp
        factor = cell // max(im.size)
        im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    im.thumbnail((cell, cell))
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


def make_grid(
    references: Sequence[Image.Image],
    target: Image.Image,
    generated: dict[str, Image.Image],
    cell: int = 128,
    max_refs: int = 4,
) -> Image.Image:
    """One row: up to ``max_refs`` references | target | one generated image per method, each labelled."""
    from PIL import Image, ImageDraw

    labels = grid_labels()
    columns = [(f"ref {i + 1}", im) for i, im in enumerate(references[:max_refs])]
    columns += [("target", target)] + [(labels.get(name, name), im) for name, im in generated.items()]
    label_h, gap = 16, 8
    groups_before = {len(references[:max_refs]), len(references[:max_refs]) + 1}  # gaps after refs and target
    width = len(columns) * cell + gap * len(groups_before)
    grid = Image.new("RGB", (width, cell + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    x = 0
    for i, (label, im) in enumerate(columns):
        if i in groups_before:
            x += gap
        grid.paste(_thumb(im, cell), (x, label_h))
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        x += cell
    return grid


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _number(x: float) -> str:
    """Three decimals, or three significant digits for small values (a reference gain of 2e-4 is not 0.000)."""
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2e}"


def _cell(s: Summary | None) -> Any:
    from markupsafe import Markup

    if s is None or s.mean != s.mean:
        return Markup("&ndash;")
    if s.low != s.low:
        return _number(s.mean)
    return Markup("{} <small>[{}, {}]</small>").format(_number(s.mean), _number(s.low), _number(s.high))


def render_report(
    summary: dict[str, dict[str, Summary]],
    info: dict[str, Any],
    grids: Sequence[tuple[str, str, Image.Image]],
    confidence: float,
    seconds_per_group: dict[str, float] | None = None,
) -> str:
    """A self-contained HTML page: the metrics table, provenance and the grids (embedded as PNG data URIs)."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("easyref.evaluate", "templates"), autoescape=select_autoescape(["j2"]))
    labels, seconds = method_labels(), seconds_per_group or {}
    rows, section = [], ""
    for key, metrics in summary.items():
        prefix, _, method = key.rpartition("/")
        row = {
            "section": prefix.removeprefix("no_") if prefix != section else "",
            "label": labels.get(method, method),
            "cells": [_cell(metrics.get(m)) for m in METRICS],
            "gain": _cell(metrics.get("reference_gain")),
            "seconds": f"{seconds[method]:.1f}" if not prefix and method in seconds else "",
        }
        section = prefix
        rows.append(row)
    easyref = summary.get("easyref", {})
    gain = None
    if "reference_gain" in easyref:
        gain = {
            k: _cell(easyref.get(m))
            for k, m in (("other", "loss_other"), ("own", "loss_own"), ("gain", "reference_gain"))
        }
    return env.get_template("report.html.j2").render(
        note=info.get("note", ""),
        pct=f"{confidence:.0%}",
        metric_labels=[METRIC_LABELS[m] for m in METRICS],
        rows=rows,
        gain=gain,
        provenance=[(k, str(v)) for k, v in info.items() if k != "note"],
        figures=[{"uri": _data_uri(img), "id": sid, "caption": caption} for sid, caption, img in grids],
    )
