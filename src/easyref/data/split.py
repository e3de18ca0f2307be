"""Split a manifest by group, as in the paper: held-out groups, held-in groups and training groups.

- held-out groups are wholly unseen in training: every image is in held_out.parquet;
- held-in groups keep their reference images in training; their target images (``--targets-per-group`` per group)
  are held out, in held_in.parquet only;
- all other groups train.

held_in.parquet and held_out.parquet have a ``role`` column: each ``target`` row is one test sample whose
references are the ``reference`` rows of the same group. train.parquet holds the training groups and the held-in
references. split.json records the counts, the seed, the thresholds, the manifest's SHA-256 and the targets of
every test group; commit.json (:mod:`easyref.data.commit`) the tables' SHA-256, written last. One run per --out
(:func:`easyref.locking.output_lock`).

Assignment. A group's 64-bit key is BLAKE2b(group, key=seed). Among groups with at least --min-group-size images,
the --held-out-groups with the smallest keys are held out and the next --held-in-groups are held in; the cut-offs
are saved in split.json as two thresholds.

No trained image is ever tested. A split made after another one, named by --previous OLD/split.json or already in
--out (unless --fresh), is pinned to it (:mod:`easyref.data.split_pins`): the old seed and thresholds place new
groups, every old group keeps its split whatever its size, old targets stay targets, and an image of the old
train.parquet is never a target or held out. Images repeated within the test groups are refused.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.data.split_types import HELD_IN, HELD_OUT, TRAIN, SplitConfig, Thresholds
from easyref.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from easyref.data.split_pins import Pins

HELP = "split a manifest into train / held-in / held-out groups (train.parquet, held_in.parquet, held_out.parquet)"

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
        "--previous",
        type=Path,
        help="an earlier split.json (its train.parquet beside it): no old group or trained image moves to a test set "
        "(default: the split already in --out, if any)",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore a split already in --out (a new experiment)")


def run(args: argparse.Namespace) -> int:
    from easyref.locking import FolderLocked, output_lock

    config = config_from_args(args)
    try:
        with output_lock(args.out, "split"):
            summary = _run_locked(args, config)
    except FolderLocked as exc:
        raise UserError(str(exc)) from None
    groups, samples = summary["groups"], summary["test_samples"]
    print(
        f"split: {groups['train']} train, {groups['held_in']} held-in, {groups['held_out']} held-out groups; "
        f"{samples['held_in']} held-in and {samples['held_out']} held-out test samples -> {args.out}"
    )
    return 0


def _run_locked(args: argparse.Namespace, config: SplitConfig) -> dict[str, Any]:
    """Pin to the earlier split (``--previous``, else the one in ``--out`` unless ``--fresh``) and split."""
    from easyref.data.split_pins import load_pins

    previous = args.previous
    if previous is None and not args.fresh and (args.out / "split.json").is_file():
        previous = args.out / "split.json"
        print(f"split: {args.out} already holds a split; pinning to it (pass --fresh to ignore it)", file=sys.stderr)
    pins = None
    if previous is not None:
        config, pins = load_pins(previous, config)
        for name in ("seed", "min_group_size", "held_out_groups", "held_in_groups"):
            flag = getattr(args, name)
            if flag is not None and flag != getattr(config, name):
                fix = "drop one of them" if args.previous is not None else "or pass --fresh for a new split"
                raise UserError(
                    f"--{name.replace('_', '-')} {flag} contradicts {previous} ({name} {getattr(config, name)}), "
                    f"which this split is pinned to; {fix}"
                )
    return split_manifest(args.manifest, args.out, config, pins=pins)


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
    manifest: str | Path, out: str | Path, config: SplitConfig, *, pins: Pins | None = None
) -> dict[str, Any]:
    """Split ``manifest`` into ``out``; returns the content of split.json.

    With ``pins`` (an earlier split, :func:`easyref.data.split_pins.load_pins`), every group that split knew keeps its
    split, its test targets stay targets, and no image that trained becomes a test image.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from easyref.data import commit
    from easyref.data.parquet import sha256_file, write_json, write_parquet
    from easyref.data.split_pins import check_test_images_unique, read_manifest

    table = read_manifest(manifest)
    groups = table["group"].combine_chunks().dictionary_encode()
    codes = groups.indices.to_numpy()
    sizes = np.bincount(codes, minlength=len(groups.dictionary))
    keys = hash_keys(groups.dictionary.to_pylist(), config.seed)
    eligible = sizes >= config.min_group_size
    thresholds = pins.thresholds if pins else thresholds_for_counts(keys[eligible], config)
    group_split = assign_groups(keys, eligible, thresholds)
    trained = np.zeros(len(table), dtype=bool)
    pinned_targets = pa.array([], type=pa.string())
    if pins is not None:
        trained = pc.is_in(table["image_id"], value_set=pins.trained_ids).to_numpy(zero_copy_only=False)
        group_split = pins.apply(groups.dictionary, group_split, np.bincount(codes[trained], minlength=len(sizes)))
        pinned_targets = pins.targets
    row_split = group_split[codes]
    check_test_images_unique(table, np.flatnonzero(row_split != TRAIN), manifest)

    held_in_rows = np.flatnonzero(row_split == HELD_IN)
    held_out_rows = np.flatnonzero(row_split == HELD_OUT)
    held_in_target = _targets(table, codes, sizes, held_in_rows, config, pinned_targets, trained)
    held_out_target = _targets(table, codes, sizes, held_out_rows, config, pinned_targets, trained)
    train_mask = row_split == TRAIN
    train_mask[held_in_rows[~held_in_target]] = True

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    commit.begin(out, "split")
    write_parquet(table.filter(pa.array(train_mask)), out / "train.parquet")
    targets = {}
    for name, rows, is_target in (
        ("held_in", held_in_rows, held_in_target),
        ("held_out", held_out_rows, held_out_target),
    ):
        roles = pa.array(np.where(is_target, "target", "reference").tolist(), type=pa.string())
        part = table.take(pa.array(rows)).append_column("role", roles)
        write_parquet(part, out / f"{name}.parquet")
        targets[name] = _targets_by_group(part)

    summary = {
        "manifest": str(manifest),
        "manifest_sha256": sha256_file(manifest),
        "previous": pins.source if pins else None,
        "seed": config.seed,
        "min_group_size": config.min_group_size,
        "held_out_groups": config.held_out_groups,
        "held_in_groups": config.held_in_groups,
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
        "targets": targets,
    }
    write_json(summary, out / "split.json")
    commit.finish(out, "split", ["train.parquet", "held_in.parquet", "held_out.parquet"])
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
    table: pa.Table,
    codes: np.ndarray,
    sizes: np.ndarray,
    rows: np.ndarray,
    config: SplitConfig,
    pinned: pa.Array,
    trained: np.ndarray,
) -> np.ndarray:
    """Whether each of ``rows`` is a target.

    Per group: the pinned targets of an earlier split first, then the images with the smallest BLAKE2b(image_id)
    keys, up to ``targets_per_group`` (or the pinned count, if larger), always leaving one reference. An image that
    trained (``trained``) is never a target.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table["image_id"].take(pa.array(rows))
    image_keys = hash_keys(ids.to_pylist(), config.seed)
    priority = np.ones(len(rows), dtype=np.int8)
    priority[pc.is_in(ids, value_set=pinned).to_numpy(zero_copy_only=False)] = 0
    priority[trained[rows]] = 2
    group_codes = codes[rows]
    order = np.lexsort((image_keys, priority, group_codes))
    sorted_codes = group_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    n_pinned = np.bincount(group_codes[priority == 0], minlength=len(sizes))
    limit = np.minimum(np.maximum(config.targets_per_group, n_pinned[sorted_codes]), sizes[sorted_codes] - 1)
    is_target = np.empty(len(rows), dtype=bool)
    is_target[order] = (rank < limit) & (priority[order] < 2)
    return is_target


def _targets_by_group(part: pa.Table) -> dict[str, list[str]]:
    """The target image ids of each group of a held-in / held-out table (pinned by later splits)."""
    result: dict[str, list[str]] = {}
    for group, image_id, role in zip(*(part[c].to_pylist() for c in ("group", "image_id", "role")), strict=True):
        targets = result.setdefault(group, [])
        if role == "target":
            targets.append(image_id)
    return {group: sorted(ids) for group, ids in sorted(result.items())}
