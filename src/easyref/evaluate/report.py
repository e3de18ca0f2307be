"""The report: one grid image per sample (references | target | each method) and a self-contained HTML page
rendered from ``templates/report.html.j2`` (installed as package data)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from easyref.evaluate.config import HEADLINE_METHODS, METRIC_LABELS, METRICS, SWAPPED, TEXT
from easyref.evaluate.paired import ORDERING_METRICS, is_paired, ordering_verdict
from easyref.evaluate.reference_gain import BAND_PREFIX

if TYPE_CHECKING:
    from PIL import Image

    from easyref.stats import Summary


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


@dataclass(frozen=True)
class ReportSection:
    """One evaluation set in the report: its metrics table, its timings and its sample grids."""

    name: str
    """The metric-key prefix (``held_in``, ``held_out``, ``dreambench``)."""
    title: str
    summary: dict[str, dict[str, Summary]]
    grids: Sequence[tuple[str, str, Image.Image]]
    """``(sample id, caption, grid)`` of the first ``report_samples`` samples."""
    seconds_per_group: dict[str, float]


def _rows(section: ReportSection) -> list[dict[str, Any]]:
    """The metrics table of a section: one row per method, then the caption subsets' rows under a heading."""
    labels, seconds = method_labels(), section.seconds_per_group
    rows, subset = [], ""
    for key, metrics in section.summary.items():
        if is_paired(key):
            continue  # in the Table 3 part
        prefix, _, method = key.rpartition("/")
        rows.append(
            {
                "subset": prefix.removeprefix("no_") if prefix != subset else "",
                "label": labels.get(method, method),
                "cells": [_cell(metrics.get(m)) for m in METRICS],
                "gain": _cell(metrics.get("reference_gain")),
                "seconds": f"{seconds[method]:.1f}" if not prefix and method in seconds else "",
            }
        )
        subset = prefix
    return rows


def _share(s: Summary) -> Any:
    from markupsafe import Markup

    if s.low != s.low:
        return f"{s.mean:+.1%}"
    return Markup("{} <small>[{}, {}]</small>").format(f"{s.mean:+.1%}", f"{s.low:+.1%}", f"{s.high:+.1%}")


def _gain(summary: dict[str, dict[str, Summary]]) -> dict[str, Any] | None:
    easyref = summary.get("easyref", {})
    if "reference_gain" not in easyref:
        return None
    cells = {
        k: _cell(easyref.get(m)) for k, m in (("other", "loss_other"), ("own", "loss_own"), ("gain", "reference_gain"))
    }
    bands = [(m.removeprefix(BAND_PREFIX).replace("_", "-"), _share(s)) for m, s in easyref.items()
             if m.startswith(BAND_PREFIX)]
    return {**cells, "bands": bands}


TABLE3_METRICS = ("clip_i", "clip_t", "dino_i")


def _signed(s: Summary | None) -> Any:
    from markupsafe import Markup

    if s is None or s.mean != s.mean:
        return Markup("&ndash;")
    mean = f"{s.mean:+.4f}"
    if s.low != s.low:
        return mean
    above = s.low > 0
    return Markup("<b>{}</b> <small>[{}, {}]</small>" if above else "{} <small>[{}, {}]</small>").format(
        mean, f"{s.low:+.4f}", f"{s.high:+.4f}"
    )


def table3(sections: Sequence[ReportSection]) -> dict[str, Any]:
    """The paper's Table 3 in kind: sections as column groups (CLIP-I, CLIP-T, DINO-I), one row per method, then the
    paired differences (EasyRef minus each baseline) and, per held-out section, whether the ordering holds."""
    labels = method_labels()
    methods = [m for m in HEADLINE_METHODS if any(m in s.summary for s in sections)]
    rows = [
        {
            "label": labels.get(m, m),
            "cells": [_cell(s.summary.get(m, {}).get(k)) for s in sections for k in TABLE3_METRICS],
        }
        for m in methods
    ]
    paired = list(dict.fromkeys(k for s in sections for k in s.summary if is_paired(k)))
    paired_rows = []
    for key in paired:
        a, _, b = key.partition("/")[2].partition("_vs_")
        paired_rows.append(
            {
                "label": f"{labels.get(a, a)} - {labels.get(b, b)}",
                "cells": [_signed(s.summary.get(key, {}).get(k)) for s in sections for k in TABLE3_METRICS],
            }
        )
    return {
        "sections": [s.title for s in sections],
        "metrics": [METRIC_LABELS[k] for k in TABLE3_METRICS],
        "rows": rows,
        "paired": paired_rows,
    }


def render_report(sections: Sequence[ReportSection], info: dict[str, Any], confidence: float) -> str:
    """A self-contained HTML page: per section the metrics table, the reference gain and the grids (embedded as
    PNG data URIs), then the provenance."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("easyref.evaluate", "templates"), autoescape=select_autoescape(["j2"]))
    pct = f"{confidence:.0%}"
    verdicts = [ordering_verdict(s.summary, s.title.split(" ")[0], pct) for s in sections if s.name == "held_out"]
    views = [
        {
            "name": section.name,
            "title": section.title,
            "primary": section.name == info.get("primary_section") and len(sections) > 1,
            "rows": _rows(section),
            "gain": _gain(section.summary),
            "figures": [{"uri": _data_uri(img), "id": sid, "caption": text} for sid, text, img in section.grids],
        }
        for section in sections
    ]
    return env.get_template("report.html.j2").render(
        note=info.get("note", ""),
        pct=pct,
        table3=table3(sections),
        verdicts=verdicts,
        ordering_metrics=" and ".join(METRIC_LABELS[m] for m in ORDERING_METRICS),
        metric_labels=[METRIC_LABELS[m] for m in METRICS],
        sections=views,
        provenance=[(k, str(v)) for k, v in info.items() if k != "note"],
    )
