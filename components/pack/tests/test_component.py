"""The pack component through kfp.local, fed by importers of a prepared split and ingest folder: into its own
artifact, and to S3 (moto on loopback)."""

from pathlib import Path

import pandas as pd
from kfp import dsl

from components.pack.component import pack
from easyref.data.dataset import DatasetConfig
from easyref.data.shards import ShardDataset
from tests.data_fixtures import moto_s3


def _pipeline():
    @dsl.pipeline(name="pack-test")
    def pack_test(split_uri: str, ingested_uri: str, destination: str) -> dsl.Dataset:
        split = dsl.importer(artifact_uri=split_uri, artifact_class=dsl.Dataset)
        ingested = dsl.importer(artifact_uri=ingested_uri, artifact_class=dsl.Dataset)
        return pack(split=split.output, ingested=ingested.output, destination=destination,
                    config={"shard_mb": 0.05}).outputs["shards"]

    return pack_test


def test_pack_writes_the_training_split_as_shards(kfp_local: Path, workspace: dict[str, Path]) -> None:
    run = _pipeline()(split_uri=str(workspace["split"]), ingested_uri=str(workspace["ingested"]), destination="")
    out = Path(run.output.path)
    assert run.output.metadata["location"] == str(out) and run.output.metadata["shards"] > 1
    train = pd.read_parquet(workspace["split"] / "train.parquet")
    dataset = ShardDataset(out, DatasetConfig(resolution=64))
    assert len(dataset) == len(train) == run.output.metadata["images"]
    assert dataset[0]["image_id"] == train["image_id"][0]


def test_pack_writes_to_s3(kfp_local: Path, workspace: dict[str, Path], monkeypatch) -> None:
    with moto_s3(monkeypatch, "shards", {}) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # inherited by kfp.local's subprocess
        run = _pipeline()(split_uri=str(workspace["split"]), ingested_uri=str(workspace["ingested"]),
                          destination="s3://shards/train")
        assert run.output.metadata["location"] == "s3://shards/train"
        assert (Path(run.output.path) / "shards.json").is_file()  # the set's record, for lineage
        assert len(ShardDataset("s3://shards/train", DatasetConfig(resolution=64))) == run.output.metadata["images"]
