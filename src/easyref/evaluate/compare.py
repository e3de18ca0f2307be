"""One table of several evaluations in the paper's layout (Table 3 / Table 5), beside the paper's published figures.

  easyref compare outputs/eval-tokens outputs/eval-mean outputs/eval-concat
  easyref compare 3f2c...e1 9ab0...77 --tracking-uri sqlite:///mlflow.db      # MLflow run ids of `easyref evaluate`

Each argument is an ``easyref evaluate`` output folder, its ``metrics.json`` (with ``evaluation.json`` beside it), or
the id of its MLflow run (both files are read from the run's artifacts); ``NAME=`` before it names its EasyRef rows.
As in the paper's Table 3, the evaluated sets are column groups (held-in, held-out, then DreamBench): one
evaluation of a split folder fills both, and separate evaluations of the same checkpoint (same variant and
checkpoint hash) fill one row together. Each row is one method: EasyRef rows say which aggregation / token count
the checkpoint has; a baseline is one row as long as its figures agree (another evaluation with other figures for
the same method and section gets a row of its own). Cells are ``mean [low, high]`` (the evaluation's intervals).
The last columns hold the paper's published numbers for the same method and section: they come from the real
models on MRBench and are printed for reference only, not measured here.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easyref.config import load_json_object
from easyref.errors import UserError
from easyref.evaluate.sections import DREAMBENCH, HELD_IN, HELD_OUT, split_keys

HELP = "compare evaluations in one table (held-in / held-out, CLIP-I / CLIP-T / DINO-I) beside the paper's figures"
COLUMNS = (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino_i", "DINO-I"))
TITLES = {HELD_IN: "held-in", HELD_OUT: "held-out", DREAMBENCH: "DreamBench"}
SECTIONS = tuple(TITLES.values())
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
METHOD_ORDER = ("easyref", "text", "ip_adapter", "lora")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Evaluation:
    """One ``easyref evaluate`` result: its flat metrics and its provenance."""

    source: str
    name: str | None
    metrics: dict[str, Any]
    info: dict[str, Any]

    def sections(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """``(section title, metrics, provenance)`` of each evaluated set, prefixes removed."""
        names = [n.strip() for n in str(self.info.get("sections", "")).split(",") if n.strip()]
        if not names:  # an evaluation of one set, written before sections were recorded
            return [(self._legacy_title(), self.metrics, self.info)]
        metrics, info = split_keys(self.metrics, names), split_keys(self.info, names)
        return [(TITLES.get(n, n), metrics[n], {**self.info, **info[n]}) for n in names]

    def _legacy_title(self) -> str:
        if "dreambench" in self.info:
            return "DreamBench"
        stem = Path(str(self.info.get("split", "?"))).stem
        return TITLES.get(stem, stem)


def methods(metrics: dict[str, Any]) -> list[str]:
    """Methods with CLIP-I in a section's whole-set metrics, EasyRef first, then the baselines."""
    found = [k.removesuffix(".clip_i") for k in metrics if k.endswith(".clip_i") and "/" not in k]
    return sorted(found, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))


@dataclass
class Row:
    """One method's row: its label, the cells of each section and its wall time per group."""

    label: str
    identity: tuple[str, ...]
    key: str
    """What the published figures are looked up by (``easyref/<aggregation>`` or the baseline)."""
    cells: dict[str, list[str]] = field(default_factory=dict)
    seconds: list[tuple[float, int]] = field(default_factory=list)
    """``(seconds per group, groups)`` of each section."""


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
    check_reachable(uri)
    folder = Path(tempfile.mkdtemp(prefix="easyref-compare-"))
    try:
        with few_http_retries():
            for name in ("metrics.json", "evaluation.json"):
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=name, dst_path=str(folder), tracking_uri=uri
                )
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"MLflow run {run_id} at {uri}: cannot read its evaluation artifacts ({first})") from exc
    return folder


PROBE_SECONDS = 5.0
FAST_FAILING = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
"""MLflow's HTTP settings for compare's reads where the user set none (MLflow's defaults retry for minutes)."""


def check_reachable(uri: str) -> None:
    """Refuse an http(s) tracking URI whose host does not accept a connection within :data:`PROBE_SECONDS`."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no credentials in the message
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UserError(
            f"tracking server {shown} does not answer ({reason}); start it, or pass --tracking-uri "
            f"(or MLFLOW_TRACKING_URI) with one that does"
        ) from None


@contextmanager
def few_http_retries() -> Iterator[None]:
    """MLflow's HTTP retries and timeout cut to :data:`FAST_FAILING` for the block, unless set in the environment."""
    added = [name for name in FAST_FAILING if name not in os.environ]
    os.environ.update({name: FAST_FAILING[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def markdown_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: backslashes and ``|`` escaped, line breaks as spaces."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


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


def _published(section: str, key: str) -> str:
    published = PUBLISHED.get((section, key))
    if isinstance(published, tuple):
        return " / ".join(f"{v:.3f}".lstrip("0") for v in published)
    return published or "–"


def table_rows(evaluations: list[Evaluation]) -> tuple[list[str], list[Row]]:
    """The sections present (in the paper's order) and one row per method, EasyRef rows first."""
    rows: list[Row] = []
    found: set[str] = set()
    for evaluation in evaluations:
        for section, metrics, info in evaluation.sections():
            found.add(section)
            for method in methods(metrics):
                if method == "easyref_swapped":
                    continue
                cells = [_cell(metrics, f"{method}.{m}") for m, _ in COLUMNS]
                label = row_label(method, evaluation)
                identity = (method, label, str(info.get("checkpoint_sha256", ""))) if method == "easyref" else (method,)
                same = [r for r in rows if r.identity == identity]
                if any(r.cells.get(section) == cells for r in same):
                    continue  # the same figures from another evaluation (a baseline run twice)
                row = next((r for r in same if section not in r.cells), None)
                if row is None:
                    suffix = f" [{evaluation.name or Path(evaluation.source).name}]" if same else ""
                    row = Row(label + suffix, identity, row_key(method, info))
                    rows.append(row)
                row.cells[section] = cells
                if (seconds := info.get(f"seconds_per_group.{method}")) is not None:
                    row.seconds.append((float(seconds), int(info.get("num_groups", 1))))
    order = {s: i for i, s in enumerate(SECTIONS)}
    sections = sorted(found, key=lambda s: (order.get(s, len(SECTIONS)), s))
    rows.sort(key=lambda r: METHOD_ORDER.index(r.identity[0]) if r.identity[0] in METHOD_ORDER else len(METHOD_ORDER))
    return sections, rows


def render(evaluations: list[Evaluation]) -> str:
    """The comparison as a Markdown table: sections as column groups, as in the paper's Table 3."""
    sections, rows = table_rows(evaluations)
    published = [s for s in sections if any(section == s for section, _ in PUBLISHED)]
    head = ["method", *(f"{s} {label}" for s in sections for _, label in COLUMNS), "s / group"]
    head += [f"{PUBLISHED_LABEL}: {s} CLIP-I / CLIP-T / DINO-I" for s in published]
    lines = ["| " + " | ".join(map(markdown_cell, head)) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, *(c for s in sections for c in row.cells.get(s, ["–"] * len(COLUMNS)))]
        groups = sum(n for _, n in row.seconds)
        cells.append(f"{sum(s * n for s, n in row.seconds) / groups:.1f}" if groups else "–")
        cells += [_published(s, row.key) for s in published]
        lines.append("| " + " | ".join(map(markdown_cell, cells)) + " |")
    lines.append("")
    lines.append(
        f"Cells: mean [interval] over the evaluated samples of each section; s / group: the method's wall time per "
        f"evaluated group over its sections. '{PUBLISHED_LABEL}': the paper's Table 3 / Table 5 figures (real SDXL "
        "+ Qwen2-VL-2B on MRBench), shown for reference; they were not measured by this project."
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
    if args.out is not None:
        _check_out(args.out)  # before any run is read or downloaded
    table = render([load_evaluation(a, args.tracking_uri) for a in args.evaluations])
    print(table)
    if args.out is not None:
        try:
            args.out.write_text(table + "\n")
        except OSError as exc:
            raise UserError(f"--out {args.out}: cannot write it ({exc.strerror or exc}); choose another path") from None
    return 0


def _check_out(out: Path) -> None:
    """``--out``'s folder created (or refused in one line: a file in its path, no permission) and not a folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out {out}: cannot create its folder {out.parent} ({exc.strerror or exc}; a file in the path?); "
            f"choose another path"
        ) from None
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a Markdown file, e.g. {out / 'compare.md'}")
