"""Split a manifest by group, as in the paper: held-out groups, held-in groups and training groups.

- held-out groups are wholly unseen in training: every image is in held_out.parquet;
- held-in groups keep their reference images in training; their target images (``--targets-per-group`` per group)
  are held out, in held_in.parquet only;
- all other groups train.

held_in.parquet and held_out.parquet have a ``role`` column: each ``target`` row is one test sample whose
references are the ``reference`` rows of the same group. train.parquet holds the training groups and the held-in
references. split.json records the counts, the seed, the thresholds and the manifest's SHA-256.

Assignment. A group's 64-bit key is BLAKE2b(group, key=seed). Among groups with at least --min-group-size images,
the --held-out-groups with the smallest keys are held out and the next --held-in-groups are held in; the cut-offs
are saved in split.json as two thresholds. With --previous OLD/split.json, the old seed and thresholds are reused
instead of counts, so that assignment is a fixed function of (seed, group): groups added since never move existing
groups, and the new groups fall into each split in the old proportions. Even without --previous, growing the data
only moves existing groups towards training (held-out -> held-in -> train), never out of it, so a model trained on
an old split never sees a new test target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

HELP = "split a manifest into train / held-in / held-out groups (train.parquet, held_in.parquet, held_out.parquet)"

TRAIN, HELD_IN, HELD_OUT = 0, 1, 2


@dataclass(kw_only=True)
class SplitConfig:
    """The ``split`` section of ``params.yaml``; command-line flags override it."""

    held_out_groups: int = 50
    """Groups held out entirely (zero-shot evaluation)."""
    held_in_groups: int = 300
    """Groups whose targets are held out while their references train."""
    min_group_size: int = 2
    """Only groups with at least this many images (a target and a reference) can be held out or held in."""
    targets_per_group: int = 1
    """Target images (test samples) per evaluation group; at least one image of each group stays a reference."""
    seed: int = 0
    """Seeds the group and target hashes."""

    def __post_init__(self) -> None:
        if self.held_out_groups < 0 or self.held_in_groups < 0:
            raise ValueError("held_out_groups and held_in_groups must not be negative")
        if self.min_group_size < 2:
            raise ValueError(f"min_group_size must be at least 2 (a target and a reference), got {self.min_group_size}")
        if self.targets_per_group < 1:
            raise ValueError(f"targets_per_group must be at least 1, got {self.targets_per_group}")


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Groups with key < ``held_out`` are held out, ``held_out`` <= key < ``held_in`` held in (if eligible)."""

    held_out: int
    held_in: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.parquet written by easyref ingest")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/split")
    parser.add_argument("--params", type=Path, help="read defaults from the 'split' section of this params.yaml")
    parser.add_argument("--held-out-groups", type=int, help="groups held out entirely (default 50)")
    parser.add_argument("--held-in-groups", type=int, help="groups whose targets are held out (default 300)")
    parser.add_argument("--min-group-size", type=int, help="smallest group that can be held out or in (default 2)")
    parser.add_argument("--targets-per-group", type=int, help="test targets per evaluation group (default 1)")
    parser.add_argument("--seed", type=int, help="hash seed (default 0)")
    parser.add_argument(
        "--previous", type=Path, help="an earlier split.json: reuse its seed and thresholds so no old group moves"
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    thresholds = None
    if args.previous is not None:
        config, thresholds = _previous(args.previous, config)
        for name in ("seed", "min_group_size", "targets_per_group"):
            flag = getattr(args, name)
            if flag is not None and flag != getattr(config, name):
                raise UserError(f"--{name.replace('_', '-')} {flag} contradicts {args.previous}; drop one of them")
    summary = split_manifest(args.manifest, args.out, config, thresholds=thresholds)
    groups, samples = summary["groups"], summary["test_samples"]
    print(
        f"split: {groups['train']} train, {groups['held_in']} held-in, {groups['held_out']} held-out groups; "
        f"{samples['held_in']} held-in and {samples['held_out']} held-out test samples -> {args.out}"
    )
    return 0


def config_from_args(args: argparse.Namespace) -> SplitConfig:
    """The config from ``--params`` (if given) with the flags that were set applied on top."""
    from easyref.config import load_section

    flags = {
        "held_out_groups": args.held_out_groups,
        "held_in_groups": args.held_in_groups,
        "min_group_size": args.min_group_size,
        "targets_per_group": args.targets_per_group,
        "seed": args.seed,
    }
    return load_section(SplitConfig, args.params, "split", flags)


def split_manifest(
    manifest: str | Path, out: str | Path, config: SplitConfig, *, thresholds: Thresholds | None = None
) -> dict[str, Any]:
    """Split ``manifest`` into ``out``; returns the content of split.json."""
    import numpy as np
    import pyarrow as pa

    from easyref.data.parquet import sha256_file, write_json, write_parquet

    table = _read_manifest(manifest)
    groups = table["group"].combine_chunks().dictionary_encode()
    codes = groups.indices.to_numpy()
    sizes = np.bincount(codes, minlength=len(groups.dictionary))
    keys = hash_keys(groups.dictionary.to_pylist(), config.seed)
    eligible = sizes >= config.min_group_size
    if thresholds is None:
        thresholds = thresholds_for_counts(keys[eligible], config)
    group_split = assign_groups(keys, eligible, thresholds)
    row_split = group_split[codes]
    _check_no_shared_images(table, np.flatnonzero(row_split != TRAIN), manifest)

    held_in_rows = np.flatnonzero(row_split == HELD_IN)
    held_out_rows = np.flatnonzero(row_split == HELD_OUT)
    held_in_target = _targets(table, codes, sizes, held_in_rows, config)
    held_out_target = _targets(table, codes, sizes, held_out_rows, config)
    train_mask = row_split == TRAIN
    train_mask[held_in_rows[~held_in_target]] = True

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(table.filter(pa.array(train_mask)), out / "train.parquet")
    for name, rows, is_target in (
        ("held_in", held_in_rows, held_in_target),
        ("held_out", held_out_rows, held_out_target),
    ):
        roles = pa.array(np.where(is_target, "target", "reference").tolist(), type=pa.string())
        write_parquet(table.take(pa.array(rows)).append_column("role", roles), out / f"{name}.parquet")

    summary = {
        "manifest": str(manifest),
        "manifest_sha256": sha256_file(manifest),
        "seed": config.seed,
        "min_group_size": config.min_group_size,
        "targets_per_group": config.targets_per_group,
        "thresholds": {"held_out": f"{thresholds.held_out:#018x}", "held_in": f"{thresholds.held_in:#018x}"},
        "groups": {
            "total": len(sizes),
            "eligible": int(eligible.sum()),
            "train": int((group_split == TRAIN).sum()),
            "held_in": int((group_split == HELD_IN).sum()),
            "held_out": int((group_split == HELD_OUT).sum()),
        },
        "images": {
            "total": len(table),
            "train": int(train_mask.sum()),
            "held_in_references": int((~held_in_target).sum()),
            "held_in_targets": int(held_in_target.sum()),
            "held_out": len(held_out_rows),
        },
        "test_samples": {"held_in": int(held_in_target.sum()), "held_out": int(held_out_target.sum())},
    }
    write_json(summary, out / "split.json")
    return summary


def hash_keys(values: list[str], seed: int) -> np.ndarray:
    """64-bit keys BLAKE2b(value, key=seed) as uint64: stable across machines and library versions."""
    import numpy as np

    salt = seed.to_bytes(16, "little", signed=True)
    digests = b"".join(hashlib.blake2b(v.encode(), digest_size=8, key=salt).digest() for v in values)
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def thresholds_for_counts(eligible_keys: np.ndarray, config: SplitConfig) -> Thresholds:
    """Thresholds that select exactly the requested numbers of groups among the eligible ones."""
    import numpy as np

    wanted = config.held_out_groups + config.held_in_groups
    if wanted >= len(eligible_keys):
        raise UserError(
            f"only {len(eligible_keys)} groups have at least {config.min_group_size} images, but "
            f"{config.held_out_groups} held-out + {config.held_in_groups} held-in groups leave none to train on; "
            f"lower --held-out-groups / --held-in-groups (the demo data uses 4 and 4) or --min-group-size"
        )
    ordered = np.sort(eligible_keys)
    return Thresholds(held_out=int(ordered[config.held_out_groups]), held_in=int(ordered[wanted]))


def assign_groups(keys: np.ndarray, eligible: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """TRAIN / HELD_IN / HELD_OUT per group: a function of the group's key, eligibility and the thresholds only."""
    import numpy as np

    split = np.full(len(keys), TRAIN, dtype=np.int8)
    split[eligible & (keys < np.uint64(thresholds.held_in))] = HELD_IN
    split[eligible & (keys < np.uint64(thresholds.held_out))] = HELD_OUT
    return split


def _targets(
    table: pa.Table, codes: np.ndarray, sizes: np.ndarray, rows: np.ndarray, config: SplitConfig
) -> np.ndarray:
    """Whether each of ``rows`` is a target: the images with the smallest BLAKE2b(image_id) keys of each group."""
    import numpy as np

    image_keys = hash_keys(table["image_id"].take(rows).to_pylist(), config.seed)
    group_codes = codes[rows]
    order = np.lexsort((image_keys, group_codes))
    sorted_codes = group_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    limit = np.minimum(config.targets_per_group, sizes[sorted_codes] - 1)
    is_target = np.empty(len(rows), dtype=bool)
    is_target[order] = rank < limit
    return is_target


def _check_no_shared_images(table: pa.Table, test_rows: np.ndarray, manifest: str | Path) -> None:
    """Refuse a manifest where an image of a test group also has another row (which could train)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    test_ids = table["image_id"].take(pa.array(test_rows)).combine_chunks()
    hits = table["image_id"].filter(pc.is_in(table["image_id"], value_set=test_ids))
    if len(hits) != len(test_rows):
        repeated = next(c["values"] for c in pc.value_counts(hits).to_pylist() if c["counts"] > 1)
        raise UserError(
            f"{manifest}: image_id {repeated} has more than one row (in two groups?), so it would leak between "
            f"splits; de-duplicate the manifest (easyref ingest does)"
        )


def _read_manifest(path: str | Path) -> pa.Table:
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise UserError(f"{path}: no such manifest; run easyref ingest first")
    table = pq.read_table(path)
    missing = [c for c in ("image_id", "group") if c not in table.column_names]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; expected a manifest written by easyref ingest"
        )
    if table.num_rows == 0:
        raise UserError(f"{path}: the manifest has no rows")
    return table


def _previous(path: Path, config: SplitConfig) -> tuple[SplitConfig, Thresholds]:
    """The seed, eligibility rule and thresholds of an earlier split.json."""
    import dataclasses

    try:
        previous = json.loads(path.read_text())
        thresholds = Thresholds(
            held_out=int(previous["thresholds"]["held_out"], 16), held_in=int(previous["thresholds"]["held_in"], 16)
        )
        pinned = {k: int(previous[k]) for k in ("seed", "min_group_size", "targets_per_group")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a split.json written by easyref split ({exc})") from exc
    return dataclasses.replace(config, **pinned), thresholds
