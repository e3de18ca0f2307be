"""easyref split never moves an image that trained into a test set, with or without --previous (issue 10 item 2).

Every route is run twice: with ``--previous OLD/split.json`` into a new folder, and into the same ``--out`` again
(where the split already there is the earlier one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from test_data_split import read_split, write_manifest

from easyref.cli import main
from easyref.data.parquet import write_parquet
from easyref.data.split import SplitConfig, hash_keys, split_manifest

CONFIG = SplitConfig(held_out_groups=12, held_in_groups=20, targets_per_group=1, seed=3)
FLAGS = ["--held-out-groups", "12", "--held-in-groups", "20", "--seed", "3"]


def resplit(tmp_path: Path, manifest: pd.DataFrame, how: str, *extra: str) -> Path:
    """Split ``manifest`` again after the split in tmp_path/old: with --previous, or into the same folder."""
    write_parquet(pa.Table.from_pandas(manifest, preserve_index=False), tmp_path / "grown.parquet")
    if how == "previous":
        out, more = tmp_path / "new", ["--previous", str(tmp_path / "old/split.json")]
    else:
        out, more = tmp_path / "again", []
        shutil.copytree(tmp_path / "old", out)
    code = main(["split", "--manifest", str(tmp_path / "grown.parquet"), "--out", str(out), *more, *extra])
    assert code == 0
    return out


def assert_no_trained_image_is_tested(old: Path, new: Path) -> None:
    old_train = set(read_split(old)[0]["image_id"])
    _, held_in, held_out, _ = read_split(new)
    assert old_train.isdisjoint(held_out["image_id"])
    assert old_train.isdisjoint(held_in.loc[held_in["role"] == "target", "image_id"])


def first_split(tmp_path: Path, n_groups: int = 300) -> pd.DataFrame:
    manifest = write_manifest(tmp_path / "m.parquet", n_groups)
    split_manifest(tmp_path / "m.parquet", tmp_path / "old", CONFIG)
    return manifest


@pytest.mark.parametrize("how", ["previous", "same_out"])
def test_a_training_group_that_grows_stays_training(tmp_path: Path, how: str) -> None:
    manifest = first_split(tmp_path)
    info = read_split(tmp_path / "old")[3]
    sizes = manifest.groupby("group").size()
    singles = sizes[sizes == 1].index
    # the singletons whose key would put them into a test split once they have two images
    held_in_cut = int(info["thresholds"]["held_in"], 16)
    at_risk = [g for g, key in zip(singles, hash_keys(list(singles), 3), strict=True) if int(key) < held_in_cut]
    assert at_risk, "the fixture must hold singleton training groups below the test threshold"
    grown = pd.concat(
        [manifest, pd.DataFrame({"image_id": [f"new-{g}" for g in at_risk], "group": at_risk, "caption": "c"})]
    )
    new = resplit(tmp_path, grown, how, *FLAGS)
    train = read_split(new)[0]
    assert set(at_risk) <= set(train["group"])
    assert_no_trained_image_is_tested(tmp_path / "old", new)


@pytest.mark.parametrize("how", ["previous", "same_out"])
def test_more_targets_per_group_never_take_a_trained_reference(tmp_path: Path, how: str) -> None:
    manifest = first_split(tmp_path)
    old_held_in = read_split(tmp_path / "old")[1]
    new = resplit(tmp_path, manifest, how, "--targets-per-group", "3")
    assert_no_trained_image_is_tested(tmp_path / "old", new)
    held_in = read_split(new)[1]
    old_targets = set(old_held_in.loc[old_held_in["role"] == "target", "image_id"])
    assert old_targets <= set(held_in.loc[held_in["role"] == "target", "image_id"])  # targets are pinned
    # new images of a held-in group may become the extra targets
    group = old_held_in.groupby("group").size().idxmax()
    extra = pd.DataFrame({"image_id": ["fresh-1", "fresh-2"], "group": group, "caption": "c"})
    newer = resplit(tmp_path, pd.concat([manifest, extra]), "previous", "--targets-per-group", "3")
    targets = read_split(newer)[1].query("role == 'target' and group == @group")["image_id"]
    assert {"fresh-1", "fresh-2"} <= set(targets)


@pytest.mark.parametrize("how", ["previous", "same_out"])
def test_a_removed_target_is_not_replaced_by_a_trained_reference(tmp_path: Path, how: str) -> None:
    manifest = first_split(tmp_path)
    old_held_in = read_split(tmp_path / "old")[1]
    targets = set(old_held_in.loc[old_held_in["role"] == "target", "image_id"])
    new = resplit(tmp_path, manifest[~manifest["image_id"].isin(targets)], how, *FLAGS)
    assert_no_trained_image_is_tested(tmp_path / "old", new)
    assert set(read_split(new)[1]["group"]) == set(old_held_in["group"])  # the groups stay held in


def test_the_same_image_twice_in_one_group_is_refused(tmp_path: Path, capsys) -> None:
    manifest = first_split(tmp_path, 100)
    held_in = read_split(tmp_path / "old")[1]
    group = held_in["group"].iloc[0]  # a test group: the old code made the copy both target and reference
    twice = manifest[manifest["group"] == group].iloc[[0]]
    write_parquet(pa.Table.from_pandas(pd.concat([manifest, twice]), preserve_index=False), tmp_path / "d.parquet")
    code = main(["split", "--manifest", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "s"), *FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and f"image_id {twice['image_id'].iloc[0]} has more than one row" in err
    assert f"group {group!r}" in err and not (tmp_path / "s/train.parquet").exists()


def test_fresh_ignores_the_split_already_in_out(tmp_path: Path, capsys) -> None:
    first_split(tmp_path, 100)
    args = ["split", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "old")]
    assert main([*args, "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "--seed 4 contradicts" in err and "--fresh" in err
    assert main([*args, "--seed", "4", "--fresh", "--held-out-groups", "2", "--held-in-groups", "2"]) == 0
    assert read_split(tmp_path / "old")[3]["seed"] == 4
