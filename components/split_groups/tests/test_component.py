"""The split_groups component through kfp.local, fed by an importer of a prepared ingest folder."""

import json
from pathlib import Path

import pandas as pd
from kfp import dsl

from components.split_groups.component import split_groups


def test_split_groups_splits_by_group(kfp_local: Path, workspace: dict[str, Path]) -> None:
    @dsl.pipeline(name="split-groups-test")
    def split_test(ingested_uri: str) -> dsl.Dataset:
        imported = dsl.importer(artifact_uri=ingested_uri, artifact_class=dsl.Dataset)
        return split_groups(ingested=imported.output, config={"held_out_groups": 2, "held_in_groups": 2,
                                                              "seed": 1}).outputs["split"]

    run = split_test(ingested_uri=str(workspace["ingested"]))

    out = Path(run.output.path)
    info = json.loads((out / "split.json").read_text())
    assert info["groups"]["held_out"] == 2 and info["groups"]["held_in"] == 2 and info["seed"] == 1
    train = pd.read_parquet(out / "train.parquet")
    held_out = pd.read_parquet(out / "held_out.parquet")
    assert not set(train["group"]) & set(held_out["group"])
