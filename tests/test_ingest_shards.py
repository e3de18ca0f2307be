"""Ingest across pods without a cluster: K shard runs and a merge write what one ``easyref ingest`` writes
(issue 18 item 2), with the same duplicate, near-duplicate and group-collision rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import noise_image, save

from easyref.cli import main
from easyref.data.demo import write_demo_data
from easyref.data.fetch import FetchConfig
from easyref.data.ingest import IngestConfig, ingest
from easyref.data.ingest_shards import ingest_shard, merge_shards
from easyref.errors import UserError

FAST = IngestConfig(workers=1, fetch=FetchConfig(timeout=5, retries=0, backoff=0))
UNIT = ("manifest.parquet", "rejected.parquet", "stats.json", "group_sizes.png")


def _sources(tmp_path: Path) -> list[str]:
    demo = tmp_path / "demo"
    write_demo_data(demo, size=64, min_images=3, max_images=4)
    extra = tmp_path / "extra"
    save(noise_image(1), extra / "shared/a.png")
    save(noise_image(1), extra / "shared/copy.png")  # exact duplicate
    save(noise_image(2), extra / "shared/b.png")
    save(noise_image(2).resize((90, 90)).resize((96, 96)), extra / "shared/near.png")  # near duplicate
    (extra / "shared/bad.png").write_text("not an image")
    other = tmp_path / "other"
    save(noise_image(3), other / "shared/c.png")  # the same group name in another source: prefixed
    save(noise_image(1), other / "shared/d.png")  # a duplicate across sources
    for folder in (extra, other):
        for image in folder.rglob("*.png"):
            image.with_suffix(".txt").write_text(f"caption of {image.name}")
    return [str(demo), str(extra), str(other)]


def _files(out: Path) -> dict[str, bytes]:
    images = {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}
    return {**images, **{name: (out / name).read_bytes() for name in UNIT}}


def test_shards_then_merge_equal_a_single_ingest(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    single = ingest(sources, tmp_path / "single", FAST, progress=False)
    assert single.reasons == {"duplicate": 2, "near_duplicate": 1, "unreadable": 1}

    infos = [ingest_shard(sources, tmp_path / f"shard{k}", FAST, k, 3, progress=False) for k in range(3)]
    merged = merge_shards(sources, [tmp_path / f"shard{k}" for k in (2, 0, 1)], tmp_path / "merged", FAST)

    assert _files(tmp_path / "merged") == _files(tmp_path / "single")
    commits = [json.loads((tmp_path / name / "commit.json").read_text()) for name in ("single", "merged")]
    assert commits[0]["files"] == commits[1]["files"] and commits[1]["complete"] is True
    assert (merged.accepted, merged.rejected, merged.reasons) == (single.accepted, single.rejected, single.reasons)
    # every image fetched by exactly one shard, and the work is spread
    assert sum(info["images"] for info in infos) == single.processed
    assert all(0 < info["images"] < single.processed for info in infos)

    again = ingest(sources, tmp_path / "merged", FAST, progress=False)  # the merged cache serves a later ingest
    assert again.processed == 0


def test_merge_refuses_missing_foreign_and_incomplete_shards(tmp_path: Path, capsys) -> None:
    sources = _sources(tmp_path)
    shard = ["ingest-shard", *sources, "--workers", "1", "--no-progress", "--shards", "2"]
    for k in range(2):
        assert main([*shard, "--out", str(tmp_path / f"s{k}"), "--shard", str(k)]) == 0
    merge = ["ingest-merge", *sources, "--workers", "1", "--no-progress", "--out", str(tmp_path / "merged")]

    assert main([*merge, "--shard-dir", str(tmp_path / "s0")]) == 2
    assert "needs all 2 shards, each once; shard(s) [1] missing" in capsys.readouterr().err
    with pytest.raises(UserError, match="other sources or other ingest settings"):
        merge_shards(sources[:2], [tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged", FAST)
    with pytest.raises(UserError, match="both shard 0"):
        merge_shards(sources, [tmp_path / "s0", tmp_path / "s0"], tmp_path / "merged", FAST)
    assert main([*shard, "--out", str(tmp_path / "s9"), "--shard", "2"]) == 2
    assert "--shard must be in 0..1" in capsys.readouterr().err

    marker = tmp_path / "s1" / "commit.json"
    marker.write_text(json.dumps({"command": "easyref ingest-shard", "complete": False}))  # as a killed shard leaves it
    assert main([*merge, "--shard-dir", str(tmp_path / "s0"), "--shard-dir", str(tmp_path / "s1")]) == 2
    assert "incomplete easyref ingest-shard output" in capsys.readouterr().err

    assert main([*shard, "--out", str(tmp_path / "s1"), "--shard", "1"]) == 0  # re-run: from its cache
    assert main([*merge, "--shard-dir", str(tmp_path / "s0"), "--shard-dir", str(tmp_path / "s1")]) == 0
    assert "0 processed" in capsys.readouterr().err
