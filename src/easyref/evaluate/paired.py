"""Paired comparisons: EasyRef minus each baseline on the same samples, and whether the paper's ordering holds.

Every method generates every sample with the same caption and seed, so the difference of a metric between two
methods on one sample measures the methods, not the sample. Per pair and metric, the mean of those per-sample
differences gets a bootstrap interval over groups (:func:`easyref.stats.bootstrap_over_groups`): samples of a group
share its references and are not independent.

Summary keys (and so metric keys): ``paired/easyref_vs_text``, ``paired/easyref_vs_ip_adapter``, ... (EasyRef
minus each other method evaluated, the swapped-reference images included), and ``paired/ip_adapter_vs_text``
(the second step of the paper's ordering); e.g. ``held_out/paired/easyref_vs_text.clip_i.ci_low``.

The paper's claim (Table 3, held-out): EasyRef > IP-Adapter > text-only SDXL on CLIP-I and DINO-I. It *holds* here
when each step's paired interval lies above 0 on both metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from easyref.evaluate.config import METRIC_LABELS, METRICS, PAIRED, TEXT, pair_key
from easyref.stats import Summary, bootstrap_over_groups

if TYPE_CHECKING:
    import pandas as pd

EASYREF, IP_ADAPTER = "easyref", "ip_adapter"
ORDERING = (EASYREF, IP_ADAPTER, TEXT)
"""The paper's held-out ordering, best first."""
ORDERING_METRICS = ("clip_i", "dino_i")
"""The metrics the ordering is claimed on (the image-similarity ones; CLIP-T measures the caption)."""
NAMES = {EASYREF: "EasyRef", IP_ADAPTER: "IP-Adapter", TEXT: "text-only"}


def pairs(methods: list[str]) -> list[tuple[str, str]]:
    """``(a, b)`` pairs compared as ``a - b``: EasyRef against every other method (text-only, IP-Adapter, LoRA first),
    then IP-Adapter - text-only."""
    first = [m for m in (TEXT, IP_ADAPTER, "lora") if m in methods]  # the paper's baselines, then the others
    others = first + [m for m in methods if m not in first and m != EASYREF]
    out = [(EASYREF, m) for m in others] if EASYREF in methods else []
    if IP_ADAPTER in methods and TEXT in methods:
        out.append((IP_ADAPTER, TEXT))
    return out


def paired_summaries(table: pd.DataFrame, confidence: float, seed: int = 0) -> dict[str, dict[str, Summary]]:
    """``{"paired/A_vs_B": {metric: Summary of A - B}}`` over the samples both methods generated."""
    methods = list(dict.fromkeys(table["method"]))
    columns = [m for m in METRICS if m in table.columns]
    by_method = {m: rows.set_index("sample_id") for m, rows in table.groupby("method", sort=False)}
    out: dict[str, dict[str, Summary]] = {}
    for a, b in pairs(methods):
        left, right = by_method[a], by_method[b]
        common = [s for s in left.index if s in right.index]
        if not common:
            continue
        groups = left.loc[common, "group"].astype(str).tolist()
        out[pair_key(a, b)] = {
            metric: bootstrap_over_groups(
                (left.loc[common, metric] - right.loc[common, metric]).tolist(), groups, confidence, seed=seed
            )
            for metric in columns
        }
    return out


def is_paired(key: str) -> bool:
    """Whether a summary key is a paired comparison's (not a method's or a caption subset's)."""
    return key.startswith(f"{PAIRED}/")


def _interval(s: Summary) -> str:
    if s.low != s.low:
        return f"{s.mean:+.4f} (no interval: one group)"
    return f"{s.mean:+.4f} [{s.low:+.4f}, {s.high:+.4f}]"


@dataclass(frozen=True)
class Verdict:
    """Whether the paper's ordering holds on one section: ``holds`` is None when it cannot be checked."""

    holds: bool | None
    sentence: str
    details: tuple[str, ...] = ()
    """One line per metric: each step's paired difference and whether its interval lies above 0."""


def ordering_verdict(summary: dict[str, dict[str, Summary]], section: str = "held-out", pct: str = "95%") -> Verdict:
    """Says in words whether EasyRef > IP-Adapter > text-only holds on CLIP-I and DINO-I (each paired interval
    above 0) in ``summary`` (a section's summaries, paired keys included)."""
    claim = " > ".join(NAMES[m] for m in ORDERING)
    missing = [NAMES[m] for m in ORDERING if m not in summary]
    if missing:
        return Verdict(
            None,
            f"The paper's {section} ordering {claim} cannot be checked: {', '.join(missing)} not evaluated "
            "(evaluate.baselines needs text and ip_adapter).",
        )
    steps = list(zip(ORDERING, ORDERING[1:], strict=False))
    details, failed = [], []
    for metric in ORDERING_METRICS:
        parts = []
        for a, b in steps:
            s = summary.get(pair_key(a, b), {}).get(metric)
            above = s is not None and s.low == s.low and s.low > 0
            shown = "missing" if s is None else _interval(s)
            parts.append(f"{NAMES[a]} - {NAMES[b]} {shown} ({'above 0' if above else 'not above 0'})")
            if not above:
                failed.append(f"{METRIC_LABELS[metric]} {NAMES[a]} - {NAMES[b]}")
        details.append(f"{METRIC_LABELS[metric]}: " + "; ".join(parts))
    metrics = " and ".join(METRIC_LABELS[m] for m in ORDERING_METRICS)
    if not failed:
        sentence = (
            f"On {section} groups the paper's ordering {claim} holds on {metrics}: every paired {pct} interval "
            "lies above 0."
        )
        return Verdict(True, sentence, tuple(details))
    sentence = (
        f"On {section} groups the paper's ordering {claim} does not hold on {metrics}: the paired {pct} interval "
        f"of {', '.join(failed)} does not lie above 0."
    )
    return Verdict(False, sentence, tuple(details))
