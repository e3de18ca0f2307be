"""Packed shards (`easyref pack`): WebDataset tar layout, the split table's samples, and `easyref train` from a local
folder and from S3 (moto on loopback) with the same per-step losses as from the files, resuming exactly after a
SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components.testing import TINY_TRAIN, build_workspace, built_once, mlflow_store, workspace_paths
from easyref.cli import main
from easyref.errors import UserError
from tests.data_fixtures import moto_s3

STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """The demo workspace of the component tests (tiny models, 12 demo groups ingested and split): built once."""
    return workspace_paths(built_once(tmp_path_factory, "component-workspace", build_workspace))


def _pack(workspace: dict[str, Path], out: str, *extra: str) -> int:
    split = workspace["split"] / "train.parquet"
    return main(["pack", "--split", str(split), "--image-root", str(workspace["ingested"]), "--out", out, *extra])


@pytest.fixture(scope="module")
def packed(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert _pack(workspace, str(out), "--shard-mb", "0.05") == 0  # ~50 kB: several shards from the demo
    return out


def test_pack_writes_webdataset_shards_byte_identically(workspace, packed, tmp_path):
    marker = json.loads((packed / "shards.json").read_text())
    index = pd.read_parquet(packed / "index.parquet")
    table = pd.read_parquet(workspace["split"] / "train.parquet")
    assert marker["complete"] and len(marker["shards"]) > 1 and marker["images"] == len(table) == len(index)
    assert list(index["image_id"]) == list(table["image_id"])  # the split table's rows, in its order
    assert all(s["bytes"] <= 50_000 or s["groups"] == 1 for s in marker["shards"])  # unless one group is more
    groups_seen = []
    for shard in marker["shards"]:
        with tarfile.open(packed / shard["name"]) as tar:
            names = tar.getnames()
            keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))  # WebDataset: key = name up to the 1st dot
            assert len(keys) == shard["groups"] and sum(n.endswith(".json") for n in names) == shard["groups"]
            for key in keys:
                record = json.loads(tar.extractfile(f"{key}.json").read())
                rows = index[index["group"] == record["group"]]
                assert [im["image_id"] for im in record["images"]] == list(rows["image_id"])
                groups_seen.append(record["group"])
                for image in record["images"]:
                    data = tar.extractfile(image["member"]).read()
                    assert data == (workspace["ingested"] / image["path"]).read_bytes()
    assert sorted(groups_seen) == sorted(set(table["group"]))  # every group once, none split over two shards
    assert _pack(workspace, str(tmp_path / "again"), "--shard-mb", "0.05") == 0
    for name in ["shards.json", "index.parquet", *(s["name"] for s in marker["shards"])]:
        assert (tmp_path / "again" / name).read_bytes() == (packed / name).read_bytes(), name


@pytest.mark.parametrize("stage", ["pretrain", "single_ref", "multi_ref"])
def test_shard_samples_equal_the_split_tables(workspace, packed, stage):
    from easyref.data.dataset import DatasetConfig, GroupDataset
    from easyref.data.shards import ShardDataset

    config = DatasetConfig(stage=stage, resolution=64, max_refs=3)
    files = GroupDataset(workspace["split"] / "train.parquet", workspace["ingested"], config)
    shards = ShardDataset(packed, config)
    assert len(files) == len(shards)
    counts = []  # (references drawn, the group's other images up to max_refs)
    for epoch in (0, 1):
        files.set_epoch(epoch)
        shards.set_epoch(epoch)
        for i in range(len(files)):
            a, b = files[i], shards[i]
            assert torch.equal(a["target"], b["target"])
            pixels = [[np.asarray(r).tobytes() for r in s["references"]] for s in (a, b)]
            assert pixels[0] == pixels[1]
            assert {k: v for k, v in a.items() if k not in ("target", "references")} == {
                k: v for k, v in b.items() if k not in ("target", "references")}
            counts.append((len(b["references"]), max(1, min(3, len(files.group_members(i)) - 1))))
    # the stage's reference rules ran on the shards: all others, exactly one, or sometimes truncated
    if stage == "pretrain":
        assert all(got == full for got, full in counts)
    elif stage == "single_ref":
        assert all(got == 1 for got, _ in counts)
    else:
        assert any(got < full for got, full in counts) and any(got == full > 1 for got, full in counts)


def test_an_incomplete_or_mixed_set_is_refused(workspace, packed, tmp_path, capsys):
    from easyref.train.data import build_dataset

    kw = dict(stage="pretrain", resolution=64, max_references=3, image_root="")
    broken = Path(shutil.copytree(packed, tmp_path / "broken"))
    marker = json.loads((broken / "shards.json").read_text())
    (broken / "shards.json").write_text(json.dumps(marker | {"complete": False}))
    with pytest.raises(UserError, match="incomplete easyref pack output"):
        build_dataset(broken, **kw)
    (broken / "shards.json").write_text(json.dumps(marker))
    (broken / "index.parquet").write_bytes((broken / "index.parquet").read_bytes() + b"\0")
    with pytest.raises(UserError, match="is not the index"):
        build_dataset(broken / "shards.json", **kw)
    missing = tmp_path / "table.parquet"
    frame = pd.read_parquet(workspace["split"] / "train.parquet")
    frame.loc[0, "path"] = "images/nowhere.jpg"
    frame.to_parquet(missing)
    code = main(["pack", "--split", str(missing), "--image-root", str(workspace["ingested"]),
                 "--out", str(tmp_path / "never")])
    assert code == 2 and "images/nowhere.jpg" in capsys.readouterr().err


# -- easyref train from shards ---------------------------------------------------------------------------------------


def _train_args(workspace, params: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "pretrain", "--params", str(params), "--base", str(workspace["models"]), "--data",
            data, "--image-root", str(workspace["ingested"]), "--out", str(out), "--max-steps", str(STEPS), *extra]


def _losses(out: Path) -> list[float]:
    from mlflow import MlflowClient

    run_id = json.loads((out / "final" / "easyref_config.json").read_text())["extra"]["mlflow_run_id"]
    history = sorted(MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    latest = {m.step: m.value for m in history}  # a resumed run logs the killed attempt's unsaved steps again
    return [latest[s] for s in sorted(latest)]


def _killed_then_resumed(args: list[str], out: Path, capsys) -> str:
    """Run ``args`` in a real process, SIGKILL it (and its DataLoader workers) once step 2's checkpoint is written,
    then run the same command again (in this process)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "easyref.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_00000002" / "state.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint before the deadline"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "final").exists(), "the run finished before it could be interrupted"
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "params.yaml"
    path.write_text(yaml.safe_dump({"train": TINY_TRAIN | {"batch_size": 2, "save_every": 1}}))
    return path


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))


@pytest.fixture(scope="module")
def files_losses(workspace, params, tmp_path_factory) -> list[float]:
    """Per-step losses of `easyref train` from the split table and the image files (the reference)."""
    folder = tmp_path_factory.mktemp("files")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_store(folder / "mlflow.db")
    try:
        assert main(_train_args(workspace, params, str(workspace["split"] / "train.parquet"), folder / "run")) == 0
        losses = _losses(folder / "run")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    assert len(losses) == STEPS and len(set(losses)) == STEPS  # the steps differ: the comparison has teeth
    return losses


def test_train_from_local_shards_gives_the_files_losses(workspace, packed, params, files_losses, tracking, tmp_path):
    assert main(_train_args(workspace, params, str(packed), tmp_path / "local")) == 0
    assert _losses(tmp_path / "local") == files_losses  # exact float equality


def test_train_from_s3_shards_gives_the_files_losses_and_resumes_exactly_after_a_kill(
    workspace, params, files_losses, tracking, tmp_path, monkeypatch, capsys
):
    with moto_s3(monkeypatch, "shards", {}) as endpoint:
        assert _pack(workspace, "s3://shards/demo/train", "--s3-endpoint", endpoint, "--shard-mb", "0.05") == 0
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # what the trainer's boto3 clients read
        out = tmp_path / "s3"
        args = _train_args(workspace, params, "s3://shards/demo/train", out, "--num-workers", "2")
        log = _killed_then_resumed(args, out, capsys)
    assert "resuming from" in log and "(step 2)" in log
    assert _losses(out) == files_losses


def test_params_yaml_pack_section_is_valid():
    from components.testing import REPO_ROOT
    from easyref.config import from_dict, load_yaml
    from easyref.data.pack import PackConfig

    assert from_dict(PackConfig, load_yaml(REPO_ROOT / "params.yaml")["pack"], "pack").shard_mb == 512
