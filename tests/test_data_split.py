"""easyref split: paper semantics, no leakage, stable assignment, determinism, clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from easyref.cli import main
from easyref.data.parquet import write_parquet
from easyref.data.split import SplitConfig, split_manifest
from easyref.errors import UserError


def write_manifest(path: Path, n_groups: int, seed: int = 0, prefix: str = "group") -> pd.DataFrame:
    """A manifest of ``n_groups`` groups of 1-6 images."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, size=n_groups)
    groups = np.repeat([f"{prefix}-{i:04d}" for i in range(n_groups)], sizes)
    frame = pd.DataFrame(
        {
            "image_id": [f"{prefix}{seed}-{i:08x}" for i in range(len(groups))],
            "path": [f"images/{i}.jpg" for i in range(len(groups))],
            "group": groups,
            "caption": "a caption",
        }
    )
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), path)
    return frame


def read_split(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    return (
        pd.read_parquet(out / "train.parquet"),
        pd.read_parquet(out / "held_in.parquet"),
        pd.read_parquet(out / "held_out.parquet"),
        json.loads((out / "split.json").read_text()),
    )


CONFIG = SplitConfig(held_out_groups=12, held_in_groups=20, targets_per_group=2, seed=3)


def test_paper_semantics_and_no_leakage(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "manifest.parquet", 300)
    split_manifest(tmp_path / "manifest.parquet", tmp_path / "split", CONFIG)
    train, held_in, held_out, info = read_split(tmp_path / "split")

    assert held_out["group"].nunique() == 12 and held_in["group"].nunique() == 20
    sizes = manifest.groupby("group").size()
    assert (sizes[held_out["group"].unique()] >= 2).all() and (sizes[held_in["group"].unique()] >= 2).all()
    # held-out groups are whole and unseen
    assert set(held_out["group"]).isdisjoint(train["group"])
    assert (held_out.groupby("group").size() == sizes[held_out.groupby("group").size().index]).all()
    # held-in: min(targets_per_group, n - 1) targets per group, the references train
    targets = held_in[held_in["role"] == "target"]
    expected = np.minimum(2, sizes[held_in["group"].unique()] - 1)
    assert (targets.groupby("group").size().sort_index() == expected.sort_index()).all()
    references = held_in[held_in["role"] == "reference"]
    assert set(references["image_id"]) <= set(train["image_id"])
    # no leakage: no held-out image and no held-in target is a training target or reference
    assert set(train["image_id"]).isdisjoint(held_out["image_id"])
    assert set(train["image_id"]).isdisjoint(targets["image_id"])
    # nothing lost, nothing doubled
    assert len(train) + len(targets) + len(held_out) == len(manifest)
    assert train["image_id"].is_unique
    assert info["test_samples"] == {"held_in": len(targets), "held_out": int((held_out["role"] == "target").sum())}
    assert info["images"]["total"] == len(manifest) and info["seed"] == 3 and len(info["manifest_sha256"]) == 64


def test_outputs_are_deterministic_and_depend_on_the_seed(tmp_path: Path) -> None:
    write_manifest(tmp_path / "manifest.parquet", 200)
    for name in ("a", "b"):
        split_manifest(tmp_path / "manifest.parquet", tmp_path / name, CONFIG)
    for file in ("train.parquet", "held_in.parquet", "held_out.parquet", "split.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    split_manifest(tmp_path / "manifest.parquet", tmp_path / "c", replace(CONFIG, seed=4))
    assert set(read_split(tmp_path / "a")[2]["group"]) != set(read_split(tmp_path / "c")[2]["group"])


def assignment(out: Path) -> dict[str, str]:
    train, held_in, held_out, _ = read_split(out)
    result = dict.fromkeys(train["group"], "train")
    result.update(dict.fromkeys(held_in["group"], "held_in"))
    result.update(dict.fromkeys(held_out["group"], "held_out"))
    return result


def test_adding_groups_never_moves_existing_ones(tmp_path: Path) -> None:
    old = write_manifest(tmp_path / "old.parquet", 400)
    new = write_manifest(tmp_path / "new-part.parquet", 400, seed=1, prefix="added")
    grown = pd.concat([old, new], ignore_index=True)
    write_parquet(pa.Table.from_pandas(grown, preserve_index=False), tmp_path / "grown.parquet")

    split_manifest(tmp_path / "old.parquet", tmp_path / "old", CONFIG)
    code = main(
        ["split", "--manifest", str(tmp_path / "grown.parquet"), "--out", str(tmp_path / "pinned")]
        + ["--previous", str(tmp_path / "old/split.json")]
    )
    assert code == 0
    before, pinned = assignment(tmp_path / "old"), assignment(tmp_path / "pinned")
    assert all(pinned[group] == split for group, split in before.items())
    assert sum(s == "held_out" for s in pinned.values()) > 12  # new groups join in the old proportions

    # with counts instead of --previous, old groups may only move towards training, never out of it
    split_manifest(tmp_path / "grown.parquet", tmp_path / "counts", CONFIG)
    recounted = assignment(tmp_path / "counts")
    order = {"held_out": 0, "held_in": 1, "train": 2}
    assert all(order[recounted[group]] >= order[split] for group, split in before.items())


def test_previous_split_conflicting_seed_is_an_error(tmp_path: Path, capsys) -> None:
    write_manifest(tmp_path / "m.parquet", 100)
    split_manifest(tmp_path / "m.parquet", tmp_path / "old", CONFIG)
    args = ["split", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "new")]
    assert main([*args, "--previous", str(tmp_path / "old/split.json"), "--seed", "9"]) == 2
    assert "--seed 9 contradicts" in capsys.readouterr().err


def test_too_few_groups_is_a_clear_error_and_small_groups_always_train(tmp_path: Path, capsys) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", 40)
    eligible = int((manifest.groupby("group").size() >= 3).sum())
    with pytest.raises(UserError, match=f"only {eligible} groups have at least 3 images"):
        split_manifest(tmp_path / "m.parquet", tmp_path / "s", SplitConfig(held_out_groups=eligible, min_group_size=3))
    code = main(["split", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "s")])
    assert code == 2 and "lower --held-out-groups" in capsys.readouterr().err

    split_manifest(
        tmp_path / "m.parquet", tmp_path / "s", SplitConfig(held_out_groups=3, held_in_groups=3, min_group_size=3)
    )
    train, held_in, held_out, _ = read_split(tmp_path / "s")
    small = set(manifest.groupby("group").size().loc[lambda s: s < 3].index)
    assert small <= set(train["group"]) and small.isdisjoint(set(held_in["group"]) | set(held_out["group"]))


def test_repeated_image_ids_are_refused(tmp_path: Path) -> None:
    # the shared image "a" is in every group, so whichever group is held out shares it with a training group
    frame = pd.DataFrame({"image_id": ["a", "b", "a", "c", "a", "d"], "group": ["x", "x", "y", "y", "z", "z"]})
    write_parquet(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "m.parquet")
    with pytest.raises(UserError, match="image_id a has more than one row"):
        split_manifest(tmp_path / "m.parquet", tmp_path / "s", SplitConfig(held_out_groups=1, held_in_groups=0))
