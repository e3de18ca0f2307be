"""GroupDataset: per-stage reference sampling, crops and buckets, batching, determinism and sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from data_fixtures import noise_image, save
from torch.utils.data import DataLoader

from easyref.data.batching import GroupBatchSampler
from easyref.data.dataset import DatasetConfig, GroupDataset, aspect_buckets, collate

GROUP_SIZES = {"solo": 1, "pair": 2, "big": 8, "mid": 5}
SHAPES = [(96, 64), (64, 96), (80, 80), (128, 48)]


@pytest.fixture(scope="module")
def image_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("images")
    rows = []
    for group, size in GROUP_SIZES.items():
        for i in range(size):
            width, height = SHAPES[(len(rows)) % len(SHAPES)]
            path = f"images/{group}-{i}.png"
            save(noise_image(len(rows), (width, height)), root / path)
            rows.append({"image_id": f"{group}-{i}", "path": path, "group": group, "caption": f"{group} {i}",
                         "width": width, "height": height})  # fmt: skip
    return pd.DataFrame(rows), root


def dataset(image_table, **config) -> GroupDataset:
    frame, root = image_table
    return GroupDataset(frame, root, DatasetConfig(resolution=64, **config))


def groups_of(ds: GroupDataset, indices: list[int]) -> set[str]:
    return {ds.groups[i] for i in indices}


def test_pretrain_uses_other_images_of_the_group(image_table) -> None:
    ds = dataset(image_table, stage="pretrain", max_refs=4)
    for index in range(len(ds)):
        refs = ds.reference_indices(index, np.random.default_rng(index))
        size = GROUP_SIZES[ds.groups[index]]
        assert groups_of(ds, refs) == {ds.groups[index]}
        assert len(refs) == (1 if size == 1 else min(4, size - 1)) and len(set(refs)) == len(refs)
        assert (index in refs) == (size == 1)  # only a lone image is its own reference
    sample = ds[0]
    assert sample["target"].shape == (3, 64, 64) and sample["target"].dtype == torch.float32
    assert -1.0 <= sample["target"].min() and sample["target"].max() <= 1.0
    assert all(ref.mode == "RGB" for ref in sample["references"])


def test_single_ref_is_exactly_one_sometimes_the_augmented_target(image_table) -> None:
    ds = dataset(image_table, stage="single_ref")
    big = [i for i in range(len(ds)) if ds.groups[i] == "big"]
    self_refs = 0
    for epoch in range(40):
        for index in big:
            refs = ds.reference_indices(index, np.random.default_rng([0, epoch, index]))
            assert len(refs) == 1 and groups_of(ds, refs) == {"big"}
            self_refs += refs[0] == index
    assert 0.05 < self_refs / (40 * len(big)) < 0.25  # 1 in 8
    solo = next(i for i in range(len(ds)) if ds.groups[i] == "solo")
    sample = ds[solo]
    assert len(sample["references"]) == 1 and sample["references"][0].size == (96, 64)


def test_multi_ref_truncates_with_probability_0_4(image_table) -> None:
    ds = dataset(image_table, stage="multi_ref", max_refs=28)
    index = next(i for i in range(len(ds)) if ds.groups[i] == "big")
    lengths = [len(ds.reference_indices(index, np.random.default_rng([0, e, index]))) for e in range(2000)]
    lengths = np.array(lengths)
    assert abs((lengths < 7).mean() - 0.4) < 0.04
    assert set(lengths[lengths < 7]) == set(range(2, 7))  # truncated to 2..n-1 of the n = 7 others
    orders = {tuple(ds.reference_indices(index, np.random.default_rng(s))) for s in range(20)}
    assert len(orders) > 10  # shuffled
    pair = next(i for i in range(len(ds)) if ds.groups[i] == "pair")
    assert all(len(ds.reference_indices(pair, np.random.default_rng(s))) == 1 for s in range(50))


def test_multi_ref_targets_use_aspect_ratio_buckets(image_table) -> None:
    frame, root = image_table
    ds = GroupDataset(frame, root, DatasetConfig(stage="multi_ref", resolution=128))
    for index in range(len(ds)):
        width, height = ds.buckets[ds.bucket_ids[index]]
        assert ds[index]["target"].shape == (3, height, width)
        assert width % 64 == 0 and height % 64 == 0
        assert (width > height) == (frame.width[index] > frame.height[index]) or width == height
    for width, height in aspect_buckets(1024):
        assert width * height <= 1024**2 and max(width, height) / min(width, height) <= 4
    assert (1024, 1024) in aspect_buckets(1024)


def test_samples_are_deterministic_per_seed_epoch_and_index(image_table) -> None:
    ds = dataset(image_table, stage="multi_ref")
    index = next(i for i in range(len(ds)) if ds.groups[i] == "big")
    first, again = ds[index], ds[index]
    assert torch.equal(first["target"], again["target"])
    assert [r.tobytes() for r in first["references"]] == [r.tobytes() for r in again["references"]]
    refs = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        refs.add(tuple(r.tobytes()[:64] for r in ds[index]["references"]))
    assert len(refs) > 1


def test_batches_with_variable_reference_counts_and_workers(image_table) -> None:
    ds = dataset(image_table, stage="multi_ref")
    sampler = GroupBatchSampler(ds.bucket_ids, batch_size=4, seed=1)
    serial = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
    parallel = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2))
    assert len(serial) == len(sampler) == len(ds) // 4
    for a, b in zip(serial, parallel, strict=True):
        assert a["image_id"] == b["image_id"] and torch.equal(a["target"], b["target"])
        assert a["target"].shape == (4, 3, 64, 64)
        assert [len(r) for r in a["references"]] == [len(r) for r in b["references"]]
    with pytest.raises(ValueError, match="different sizes"):
        collate([{**ds[0], "target": torch.zeros(3, 64, 64)}, {**ds[1], "target": torch.zeros(3, 64, 128)}])


def test_sampler_shards_are_disjoint_equal_and_bucket_pure() -> None:
    bucket_ids = np.random.default_rng(0).integers(0, 3, size=1000)
    shards = [GroupBatchSampler(bucket_ids, 8, rank=r, world_size=3, seed=5) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    batches = [list(shard) for shard in shards]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(shards[0])
    seen = [i for shard in batches for batch in shard for i in batch]
    assert len(seen) == len(set(seen)) and len(seen) > 0.9 * len(bucket_ids)
    assert all(len(set(bucket_ids[batch])) == 1 and len(batch) == 8 for shard in batches for batch in shard)
    again = GroupBatchSampler(bucket_ids, 8, rank=0, world_size=3, seed=5)
    again.set_epoch(2)
    assert list(again) == batches[0]
    again.set_epoch(3)
    assert list(again) != batches[0]
