"""The ingest shards through kfp.local, merged by the ingest_merge component's function (kfp.local does not run
ParallelFor or collect a list of artifacts): the merged folder equals a single ingest task's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import Dataset, Markdown, Metrics

from components.ingest.component import ingest
from components.ingest_merge.component import ingest_merge

UNIT = ("manifest.parquet", "rejected.parquet", "stats.json")


def test_shard_tasks_then_merge_equal_one_ingest_task(kfp_local: Path, workspace: dict[str, Path], tmp_path: Path):
    sources, config = [str(workspace["raw"])], {"workers": 1, "image": {"max_side": 256}}
    single = ingest(sources=sources, config=config)
    shards = [ingest(sources=sources, config=config, shard=k, shards=2) for k in range(2)]
    images = [task.outputs["stats"].metadata["images"] for task in shards]
    assert (
        all(images)
        and sum(images) == json.loads((Path(single.outputs["ingested"].path) / "stats.json").read_text())["rows"]
    )
    assert "shard 1 of 2" in Path(shards[1].outputs["summary"].path).read_text()

    outputs = {
        name: kind(uri=str(tmp_path / "merged" / name))
        for name, kind in (("ingested", Dataset), ("stats", Metrics), ("summary", Markdown))
    }
    (tmp_path / "merged").mkdir()
    ingest_merge.python_func(sources=sources, shards=[t.outputs["ingested"] for t in shards], config=config, **outputs)

    merged, expected = Path(outputs["ingested"].path), Path(single.outputs["ingested"].path)
    for name in UNIT:
        assert (merged / name).read_bytes() == (expected / name).read_bytes(), name
    assert sorted(p.name for p in (merged / "images").rglob("*.jpg")) == sorted(
        p.name for p in (expected / "images").rglob("*.jpg")
    )
    assert outputs["ingested"].metadata["groups"] == single.outputs["ingested"].metadata["groups"]
    assert "images accepted" in Path(outputs["summary"].path).read_text()


def test_merge_fails_without_every_shard(kfp_local: Path, workspace: dict[str, Path], tmp_path: Path) -> None:
    sources = [str(workspace["raw"])]
    shard = ingest(sources=sources, config={"workers": 1}, shard=0, shards=2)
    outputs = {
        name: kind(uri=str(tmp_path / name))
        for name, kind in (("ingested", Dataset), ("stats", Metrics), ("summary", Markdown))
    }
    with pytest.raises(Exception, match="returned non-zero exit status 2"):
        ingest_merge.python_func(sources=sources, shards=[shard.outputs["ingested"]], config={"workers": 1}, **outputs)
