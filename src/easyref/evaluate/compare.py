"""One table of several evaluations in the paper's layout (Table 3 / Table 5), beside the paper's published figures.

  easyref compare outputs/eval-tokens outputs/eval-mean outputs/eval-concat
  easyref compare 3f2c...e1 9ab0...77 --tracking-uri sqlite:///mlflow.db      # MLflow run ids of `easyref evaluate`

Each argument is an ``easyref evaluate`` output folder, its ``metrics.json`` (with ``evaluation.json`` beside it), or
the id of its MLflow run (both files are read from the run's artifacts); ``NAME=`` before it names its EasyRef rows.
Rows are grouped into sections by the evaluated split (held-in, held-out, DreamBench); each row is one method of one
evaluation (EasyRef rows say which aggregation / token count the checkpoint has; a baseline evaluated several times
on the same split with the same figures is shown once). Cells are ``mean [low, high]`` (the evaluation's
intervals). The last column holds the paper's published numbers for the same method and section: they come from
the real models on MRBench and are printed for reference only, not measured here.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from easyref.config import load_json_object
from easyref.errors import UserError

HELP = "compare evaluations in one table (held-in / held-out, CLIP-I / CLIP-T / DINO-I) beside the paper's figures"
COLUMNS = (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino_i", "DINO-I"))
SECTIONS = ("held-in", "held-out", "DreamBench")
PUBLISHED_LABEL = "published (paper), not ours"
# (section, row key) -> CLIP-I / CLIP-T / DINO-I of the paper (Table 3; Table 5 = the aggregation ablation, held-out)
PUBLISHED: dict[tuple[str, str], tuple[float, float, float] | str] = {
    ("held-in", "easyref/tokens"): (0.843, 0.726, 0.672),
    ("held-out", "easyref/tokens"): (0.833, 0.709, 0.614),
    ("held-in", "ip_adapter"): (0.768, 0.632, 0.527),
    ("held-out", "ip_adapter"): (0.795, 0.645, 0.579),
    ("held-in", "lora"): (0.831, 0.715, 0.654),
    ("held-out", "lora"): "no figure (the paper marks it as failing on unseen groups)",
    ("held-out", "easyref/mean"): (0.818, 0.688, 0.584),
    ("held-out", "easyref/concat"): (0.821, 0.692, 0.579),
}
BASELINE_LABELS = {"text": "SDXL, text only", "ip_adapter": "IP-Adapter-SDXL (mean)", "lora": "Per-group LoRA"}
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Evaluation:
    """One ``easyref evaluate`` result: its flat metrics and its provenance."""

    source: str
    name: str | None
    metrics: dict[str, Any]
    info: dict[str, Any]

    @property
    def section(self) -> str:
        if "dreambench" in self.info:
            return "DreamBench"
        stem = Path(str(self.info.get("split", "?"))).stem
        return {"held_in": "held-in", "held_out": "held-out"}.get(stem, stem)

    def methods(self) -> list[str]:
        """Methods with CLIP-I in the whole-split section, in the order the evaluation wrote them."""
        found = [k.removesuffix(".clip_i") for k in self.metrics if k.endswith(".clip_i") and "/" not in k]
        order = ("easyref", "text", "ip_adapter", "lora")
        return sorted(found, key=lambda m: order.index(m) if m in order else len(order))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: no such file ({what}, written by `easyref evaluate --out DIR`)")
    return load_json_object(path)


def load_evaluation(argument: str, tracking_uri: str | None = None) -> Evaluation:
    """An evaluation from ``[NAME=]FOLDER | METRICS.JSON | MLFLOW_RUN_ID``."""
    name, _, source = argument.partition("=") if "=" in argument else ("", "", argument)
    path = Path(source)
    if not path.exists() and RUN_ID.match(source):
        path = _download_run(source, tracking_uri)
    elif not path.exists():
        raise UserError(f"{source}: neither an evaluation folder / metrics.json nor an MLflow run id (32 hex digits)")
    folder = path if path.is_dir() else path.parent
    metrics_file = path if path.is_file() else folder / "metrics.json"
    metrics = _read_json(metrics_file, "metrics")
    evaluation = Evaluation(source, name or None, metrics, _read_json(folder / "evaluation.json", "provenance"))
    if "easyref.clip_i" not in metrics:
        raise UserError(f"{metrics_file}: no easyref.clip_i; not a metrics.json of `easyref evaluate`")
    return evaluation


def _download_run(run_id: str, tracking_uri: str | None) -> Path:
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from easyref.registry import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    folder = Path(tempfile.mkdtemp(prefix="easyref-compare-"))
    try:
        for name in ("metrics.json", "evaluation.json"):
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(folder), tracking_uri=uri
            )
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"MLflow run {run_id} at {uri}: cannot read its evaluation artifacts ({first})") from exc
    return folder


def row_key(method: str, info: dict[str, Any]) -> str:
    """``easyref/<aggregation>`` for the checkpoint (``tokens`` when not recorded), else the method."""
    return f"easyref/{info.get('model.aggregation', 'tokens')}" if method == "easyref" else method


def row_label(method: str, evaluation: Evaluation) -> str:
    if method != "easyref":
        return BASELINE_LABELS.get(method, method) + (" (swapped references)" if method == "easyref_swapped" else "")
    info = evaluation.info
    variant = f"aggregation={info.get('model.aggregation', 'tokens')}"
    if "model.num_tokens" in info:
        variant += f", tokens={info['model.num_tokens']}, layer={info.get('model.insertion_layer', -1)}"
    return f"EasyRef {evaluation.name or ''} ({variant})".replace("  ", " ")


def _cell(metrics: dict[str, Any], key: str) -> str:
    mean, low, high = (metrics.get(k) for k in (key, f"{key}.ci_low", f"{key}.ci_high"))
    if mean is None:
        return "–"
    if low is None or high is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def table_rows(evaluations: list[Evaluation]) -> list[tuple[str, list[str]]]:
    """``(section, cells)`` per row; cells = method, CLIP-I, CLIP-T, DINO-I, seconds per group, published."""
    rows: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, ...]] = set()
    order = {s: i for i, s in enumerate(SECTIONS)}
    for evaluation in sorted(evaluations, key=lambda e: order.get(e.section, len(SECTIONS))):
        section = evaluation.section
        for method in evaluation.methods():
            if method == "easyref_swapped":
                continue
            cells = [_cell(evaluation.metrics, f"{method}.{m}") for m, _ in COLUMNS]
            label = row_label(method, evaluation)
            if method != "easyref" and (section, label, *cells) in seen:
                continue
            seen.add((section, label, *cells))
            seconds = evaluation.info.get(f"seconds_per_group.{method}")
            published = PUBLISHED.get((section, row_key(method, evaluation.info)))
            if isinstance(published, tuple):
                reference = " / ".join(f"{v:.3f}".lstrip("0") for v in published)
            else:
                reference = published or "–"
            rows.append((section, [label, *cells, "–" if seconds is None else f"{seconds:.1f}", reference]))
    return rows


def render(evaluations: list[Evaluation]) -> str:
    """The comparison as a Markdown table, one bold row per section."""
    head = ["method", *(label for _, label in COLUMNS), "s / group", f"{PUBLISHED_LABEL}: CLIP-I / CLIP-T / DINO-I"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    section = None
    for row_section, cells in table_rows(evaluations):
        if row_section != section:
            section = row_section
            lines.append(f"| **{section}** |" + " |" * (len(head) - 1))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Cells: mean [interval] over the evaluated samples. '{PUBLISHED_LABEL}': the paper's Table 3 / Table 5 "
        "figures (real SDXL + Qwen2-VL-2B on MRBench), shown for reference; they were not measured by this project."
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "evaluations",
        nargs="+",
        metavar="[NAME=]RUN_OR_METRICS",
        help="an `easyref evaluate` output folder, its metrics.json, or its MLflow run id",
    )
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI for run ids (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def run(args: argparse.Namespace) -> int:
    table = render([load_evaluation(a, args.tracking_uri) for a in args.evaluations])
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0
