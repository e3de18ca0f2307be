"""The ingest component through kfp.local (subprocess runner, this environment)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from components.ingest.component import ingest


def test_ingest_writes_manifest_stats_and_summary(kfp_local: Path, workspace: dict[str, Path]) -> None:
    task = ingest(sources=[str(workspace["raw"])], config={"workers": 1, "image": {"max_side": 256}})

    out = Path(task.outputs["ingested"].path)
    manifest = pd.read_parquet(out / "manifest.parquet")
    stats = json.loads((out / "stats.json").read_text())
    assert len(manifest) == stats["accepted"] > 0
    assert (out / "images").is_dir() and (out / "rejected.parquet").is_file()
    metrics = task.outputs["stats"].metadata
    assert metrics["accepted"] == stats["accepted"] and metrics["groups"] == stats["groups"]
    assert task.outputs["ingested"].metadata["groups"] == manifest["group"].nunique()
    assert "images accepted" in Path(task.outputs["summary"].path).read_text()


def test_ingest_fails_on_bad_config(kfp_local: Path, workspace: dict[str, Path]) -> None:
    # an unknown params key is a UserError in easyref ingest; the task must fail, not produce an empty dataset
    with pytest.raises(RuntimeError, match="FAILURE"):
        ingest(sources=[str(workspace["raw"])], config={"no_such_key": 1})
