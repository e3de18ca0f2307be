"""The evaluation sets of one run, MRBench-style: held-in, held-out and, optionally, DreamBench.

The paper scores two sets separately: **held-in** samples (targets of groups whose references were trained on,
``held_in.parquet``) and **held-out** samples (groups never seen in training, ``held_out.parquet``); DreamBench is
a third set when a DreamBench folder is given. ``--split`` names the folder ``easyref split`` wrote (both files are
evaluated) or one of its files (that section only).

Metric keys: every section's keys are prefixed with its name (``held_in/easyref.clip_i``,
``held_out/no_colour/easyref.clip_i``, ``dreambench/num_samples``); the unprefixed keys (``easyref.clip_i``,
``easyref.reference_gain.ci_low``, ``num_samples``) repeat the **primary** section: held-out when it was evaluated
(the paper's claim is about unseen groups), else held-in, else DreamBench. The registration gate reads those.
"""

from __future__ import annotations

import itertools
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.errors import UserError
from easyref.evaluate.config import EvaluateConfig
from easyref.evaluate.samples import Sample, load_dreambench, load_split, with_draws

if TYPE_CHECKING:
    from PIL import Image

HELD_IN, HELD_OUT, DREAMBENCH = "held_in", "held_out", "dreambench"
ORDER = (HELD_IN, HELD_OUT, DREAMBENCH)
"""The paper's order of the sections (Table 3: held-in, then held-out)."""
PRIMARY_ORDER = (HELD_OUT, HELD_IN, DREAMBENCH)
"""Which section the unprefixed keys (and so the registration gate) read: the first of these evaluated."""
TITLES = {
    HELD_IN: "held-in (targets of training groups)",
    HELD_OUT: "held-out (groups unseen in training)",
    DREAMBENCH: "DreamBench",
}
SPLIT_FILES = (f"{HELD_IN}.parquet", f"{HELD_OUT}.parquet")


@dataclass(frozen=True)
class Section:
    """One evaluation set: its name (metric-key prefix), its samples and where they came from."""

    name: str
    samples: list[Sample]
    """Every image to generate: the samples (draw 0), then their further draws (``evaluate.images_per_sample``)."""
    source: dict[str, str] = field(default_factory=dict)
    """``split`` + ``split_sha256``, or ``dreambench`` (the folder)."""

    @property
    def first_draws(self) -> list[Sample]:
        """One entry per sample (its first draw): what the reference gain measures and the report shows."""
        return [s for s in self.samples if s.draw == 0]

    @property
    def title(self) -> str:
        return TITLES.get(self.name, self.name)

    @property
    def num_groups(self) -> int:
        return len({s.group for s in self.samples})


@dataclass
class SectionRun:
    """What one section's evaluation produced: images per method, their wall time, the reference gains."""

    section: Section
    generated: dict[str, list[Image.Image]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Generation (and any tuning) wall time of each method on this section."""
    tuning: dict[str, float] = field(default_factory=dict)
    """Tuning-based baselines: mean tuning time per group, generation excluded."""
    gains: list[dict[str, float]] | None = None

    @property
    def name(self) -> str:
        return self.section.name

    def timed(self, method: str, generate: Callable[..., list[Image.Image]], *args: Any) -> None:
        """``generated[method] = generate(*args)``, timing it."""
        begin = time.perf_counter()
        self.generated[method] = generate(*args)
        self.seconds[method] = time.perf_counter() - begin
        if tuned := getattr(generate, "tuning_seconds", None):  # per group, of this call only
            self.tuning[method] = round(sum(tuned.values()) / len(tuned), 3)
            tuned.clear()

    def per_group(self) -> dict[str, float]:
        """Seconds per group of each timed method."""
        return {method: round(s / self.section.num_groups, 3) for method, s in self.seconds.items()}

    def info(self) -> dict[str, Any]:
        """This section's provenance and timings (keys of evaluation.json, before the section prefix)."""
        return {
            **self.section.source,
            "num_samples": len(self.section.first_draws),
            "images_per_sample": len(self.section.samples) // max(len(self.section.first_draws), 1),
            "num_groups": self.section.num_groups,
            **{f"seconds_per_group.{method}": s for method, s in self.per_group().items()},
            **{f"tuning_seconds_per_group.{method}": s for method, s in self.tuning.items()},
        }


def section_name(split_file: Path) -> str:
    """``held_in`` / ``held_out`` for easyref split's files; another file's stem, made key-safe."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", split_file.stem) or "split"


def split_files(split: Path) -> list[Path]:
    """The split files ``--split`` names: held_in.parquet and held_out.parquet of a folder, or the one file."""
    if split.is_dir():
        files = [split / name for name in SPLIT_FILES if (split / name).is_file()]
        if not files:
            raise UserError(f"{split}: neither {' nor '.join(SPLIT_FILES)} in this folder (written by `easyref split`)")
        return files
    if not split.is_file():
        raise UserError(f"{split}: no such split file or folder (written by `easyref split`)")
    return [split]


def _has_targets(split_file: Path) -> bool:
    """False only for a readable split file with a role column and no target row (e.g. ``held_in_groups: 0``)."""
    import pandas as pd

    try:
        roles = pd.read_parquet(split_file, columns=["role"])["role"]
    except Exception:  # noqa: BLE001 - load_split reports what is wrong with the file
        return True
    return bool((roles == "target").any())


def spread_over_groups(samples: list[Sample], limit: int | None) -> list[Sample]:
    """At most ``limit`` samples (``None``: all, in their order), taken from the groups in turn: the first sample
    of every group, then the second of every group, and so on, groups in their order of appearance. A limit below
    the set's size thus covers as many groups as it can (the first N rows would all be the first group's when a
    group has many targets, as DreamBench's 25 prompts per subject)."""
    if limit is None or limit >= len(samples):
        return samples
    by_group: dict[str, list[Sample]] = {}
    for sample in samples:
        by_group.setdefault(sample.group, []).append(sample)
    turns = (group[i] for i in range(max(map(len, by_group.values()))) for group in by_group.values() if i < len(group))
    return list(itertools.islice(turns, limit))


def load_sections(
    split: Path | None, dreambench: Path | None, images_root: Path | None, config: EvaluateConfig
) -> list[Section]:
    """The sections to evaluate, in the paper's order; ``max_samples`` applies to each section."""
    from easyref.data.parquet import sha256_file

    sections = []
    if split is not None:
        files = split_files(split)
        for file in files:
            if len(files) > 1 and not _has_targets(file):
                print(f"evaluate: {file} has no target rows; its section is skipped", file=sys.stderr)
                continue
            samples = load_split(file, images_root, config.seed)
            source = {"split": str(file), "split_sha256": sha256_file(file)}
            limited = spread_over_groups(samples, config.max_samples)
            sections.append(Section(section_name(file), with_draws(limited, config.images_per_sample, config.seed),
                                    source))
        if not sections:
            raise UserError(f"{split}: no target rows in {' or '.join(f.name for f in files)}: nothing to evaluate")
    if dreambench is not None:
        samples = load_dreambench(dreambench, config.dreambench, config.seed)
        limited = with_draws(spread_over_groups(samples, config.max_samples), config.images_per_sample, config.seed)
        sections.append(Section(DREAMBENCH, limited, {"dreambench": str(dreambench)}))
    if not sections:
        raise UserError("nothing to evaluate: pass --split (a split folder or file) and/or --dreambench DIR")
    names = [s.name for s in sections]
    if len(set(names)) < len(names):
        raise UserError(f"two evaluation sets are both named {names[0]!r}; rename one of the split files")
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(sections, key=lambda s: rank.get(s.name, len(ORDER)))


def primary(names: list[str]) -> str:
    """The section the unprefixed keys repeat: held-out, else held-in, else DreamBench, else the first."""
    return next((name for name in PRIMARY_ORDER if name in names), names[0])


def combine(per_section: Mapping[str, Mapping[str, Any]], primary_name: str) -> dict[str, Any]:
    """``{f"{section}/{key}": value}`` for every section, then the primary section's keys unprefixed."""
    out: dict[str, Any] = {}
    for name, values in per_section.items():
        out.update({f"{name}/{key}": value for key, value in values.items()})
    return {**per_section[primary_name], **out}


def split_keys(values: Mapping[str, Any], sections: list[str]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`combine`: ``{section: {key: value}}`` for the prefixed keys of ``sections``."""
    out: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in values.items():
        prefix, _, rest = key.partition("/")
        if prefix in out and rest:
            out[prefix][rest] = value
    return out
