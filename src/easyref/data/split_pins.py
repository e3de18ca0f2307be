"""What a split must keep from an earlier one, and the checks on a manifest before it is split.

An earlier split (``--previous OLD/split.json``, or the split already in ``--out``) pins:

- its seed, eligibility rule and thresholds, so new groups fall into each split in the old proportions;
- every group it knew: a training group stays training whatever its size becomes, a held-in or held-out group
  stays so, and its test targets stay targets (recorded per group in ``split.json``);
- every image that trained (``train.parquet`` beside it): such an image is never a test target, and a held-out
  group that now holds one moves to training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from easyref.data.split_types import HELD_IN, HELD_OUT, TRAIN, SplitConfig, Thresholds
from easyref.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa



@dataclass(frozen=True, kw_only=True)
class Pins:
    """An earlier split's decisions that a new split keeps."""

    source: str
    thresholds: Thresholds
    held_in: pa.Array
    """Groups that were held in."""
    held_out: pa.Array
    """Groups that were held out."""
    train_groups: pa.Array
    """Groups that trained (held-in groups excluded)."""
    trained_ids: pa.Array
    """Image ids of ``train.parquet``: every image that trained."""
    targets: pa.Array
    """Image ids that were test targets."""

    def apply(self, names: pa.Array, group_split: np.ndarray, trained_per_group: np.ndarray) -> np.ndarray:
        """``group_split`` (by threshold) with the pinned groups put back where they were."""
        import pyarrow.compute as pc

        split = group_split.copy()
        for value_set, value in ((self.train_groups, TRAIN), (self.held_in, HELD_IN), (self.held_out, HELD_OUT)):
            split[pc.is_in(names, value_set=value_set).to_numpy(zero_copy_only=False)] = value
        split[(trained_per_group > 0) & (split == HELD_OUT)] = TRAIN  # a trained image is never held out
        return split


def load_pins(path: Path, config: SplitConfig) -> tuple[SplitConfig, Pins]:
    """The pins of the split whose ``split.json`` is ``path``, and ``config`` with its seed and eligibility rule."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from easyref.data import commit

    train_file = path.parent / "train.parquet"
    try:
        previous = json.loads(path.read_text())
        thresholds = Thresholds(
            held_out=int(previous["thresholds"]["held_out"], 16), held_in=int(previous["thresholds"]["held_in"], 16)
        )
        pinned = {k: int(previous[k]) for k in ("seed", "min_group_size")}
        for name in ("held_out", "held_in"):  # the counts the thresholds were cut for (older files: the groups held)
            pinned[f"{name}_groups"] = int(previous.get(f"{name}_groups", previous["groups"][name]))
        targets = {name: dict(previous["targets"][name]) for name in ("held_in", "held_out")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{path}: not a split.json written by this version of easyref split (missing {exc}); "
            f"pass --fresh for a new split"
        ) from exc
    if not train_file.is_file():
        raise UserError(f"{path}: no train.parquet beside it, so what trained is unknown; copy the whole split folder")
    try:
        commit.check(train_file)
    except UserError as exc:
        raise UserError(
            f"{exc}; its pins cannot be trusted: pass --previous with an intact split, or --fresh"
        ) from None
    trained = pq.read_table(train_file, columns=["group", "image_id"])
    held_in = pa.array(sorted(targets["held_in"]), type=pa.string())
    train_groups = pc.unique(trained["group"].combine_chunks().cast(pa.string()))
    pins = Pins(
        source=str(path),
        thresholds=thresholds,
        held_in=held_in,
        held_out=pa.array(sorted(targets["held_out"]), type=pa.string()),
        train_groups=train_groups.filter(pc.invert(pc.is_in(train_groups, value_set=held_in))),
        trained_ids=trained["image_id"].combine_chunks().cast(pa.string()),
        targets=pa.array(
            sorted(i for ids in (*targets["held_in"].values(), *targets["held_out"].values()) for i in ids)
        ),
    )
    return dataclasses.replace(config, **pinned), pins


def read_manifest(path: str | Path) -> pa.Table:
    """A manifest to split: a parquet file with text ``image_id`` and ``group`` columns without nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise UserError(f"{path}: no such manifest; run easyref ingest first")
    from easyref.data import commit

    commit.check(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{path}: not a parquet manifest ({exc}); pass the manifest.parquet written by easyref ingest"
        ) from None
    missing = [c for c in ("image_id", "group") if c not in table.column_names]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; expected a manifest written by easyref ingest"
        )
    if table.num_rows == 0:
        raise UserError(f"{path}: the manifest has no rows")
    for column in ("image_id", "group"):
        values = table[column]
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise UserError(
                f"{path}: column {column!r} holds {values.type} values (row 0: {values[0].as_py()!r}), not text; "
                f"re-run easyref ingest, which writes text"
            )
        nulls = pc.is_null(values).to_numpy(zero_copy_only=False)
        if nulls.any():
            raise UserError(f"{path}: row {int(nulls.argmax())}: {column} is null; every row needs one")
    table = table.cast(
        pa.schema([f.with_type(pa.string()) if f.name in ("image_id", "group") else f for f in table.schema])
    )
    return table


def check_test_images_unique(table: pa.Table, test_rows: np.ndarray, path: str | Path) -> None:
    """Refuse a manifest where an image of a held-in / held-out group has a second row, in its own group (it would
    be both target and reference) or in another (it could train). Only the test rows are hashed: fast on millions
    of rows, and a repeated image among training rows cannot leak."""
    import pyarrow as pa
    import pyarrow.compute as pc

    test_ids = pc.unique(table["image_id"].take(pa.array(test_rows)))
    hits = pc.is_in(table["image_id"], value_set=test_ids)
    if pc.sum(hits).as_py() in (None, len(test_ids)):
        return
    counts = pc.value_counts(table["image_id"].filter(hits))
    image_id = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
    rows = pc.indices_nonzero(pc.equal(table["image_id"], image_id)).to_pylist()
    where = ", ".join(f"row {r} (group {table['group'][r].as_py()!r})" for r in rows[:4])
    raise UserError(
        f"{path}: image_id {image_id} has more than one row ({len(rows)}: {where}); one image must not be both a "
        f"target and a reference or sit in two splits. De-duplicate the manifest (easyref ingest does)"
    )
