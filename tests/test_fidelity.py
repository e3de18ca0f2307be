"""Details where training follows SDXL and the authors' code: an fp32 VAE under bf16 autocast, size/crop time ids,
the SDXL scheduler keys of the tiny profile."""

from __future__ import annotations

import json
from importlib import resources

import pandas as pd
import pytest
import torch
from PIL import Image

from easyref.data.dataset import DatasetConfig, GroupDataset
from easyref.train.data import FolderGroups, collate
from easyref.train.recipe import Conditioner, sdxl_time_ids
from tests.conftest import SMALL_PIXELS, make_group

# (width, height) of the saved images -> the time ids of their 32 px square targets:
# 96x80 is resized to 39x32 (the height binds) and cropped at left 3; 60x90 to 32x48, cropped at top 8.
EXPECTED = {(96, 80): [80, 96, 0, 3, 32, 32], (60, 90): [90, 60, 8, 0, 32, 32]}


@pytest.fixture(scope="module")
def conditioner(tiny_models) -> Conditioner:
    from easyref.base_models import BaseModels
    from easyref.model import ModelConfig

    config = ModelConfig(num_tokens=8, **SMALL_PIXELS)
    return Conditioner(BaseModels.load(tiny_models / "sdxl", tiny_models / "mllm", config), (0.0, 0.0, 0.0))


def test_vae_encodes_in_float32_under_bf16_autocast(conditioner):
    """The step runs under bf16 autocast on GPU; the VAE must not: its latents equal the plain fp32 ones exactly."""
    target = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = conditioner.encode_latents(target, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = conditioner.encode_latents(target, torch.Generator().manual_seed(1))
    assert plain.dtype == mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)


def _non_square_groups(root):
    (root / "g").mkdir(parents=True)
    lines = []
    for i, size in enumerate(EXPECTED):
        make_group(i, 1, size)[0].save(root / "g" / f"{i}.png")
        lines.append(json.dumps({"image": f"g/{i}.png", "caption": "a shape"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_time_ids_are_each_images_original_size_and_crop_corner(tmp_path, conditioner):
    """Loading, resizing and cropping record (original size, crop top-left); collate and the conditioner carry them
    into the UNet's time ids (was: (H, W, 0, 0, H, W) for every image)."""
    dataset = FolderGroups(_non_square_groups(tmp_path), resolution=32)
    samples = [dataset[i] for i in range(len(dataset))]
    sizes = [Image.open(tmp_path / "g" / f"{i}.png").size for i in range(len(dataset))]
    batch = collate(samples)
    assert batch["original_size"].tolist() == [[h, w] for w, h in sizes]
    c = conditioner(batch, torch.Generator().manual_seed(0))
    assert c.time_ids.tolist() == [EXPECTED[s] for s in sizes]


def test_split_table_samples_carry_size_and_crop_too(tmp_path):
    """The split-table dataset (stage 3's aspect buckets included) records the same two facts."""
    rows = []
    for i, (w, h) in enumerate([*EXPECTED, (200, 90)]):
        make_group(i, 1, (w, h))[0].save(tmp_path / f"{i}.png")
        rows.append({"image_id": str(i), "path": f"{i}.png", "group": "g", "caption": "", "width": w, "height": h})
    square = GroupDataset(pd.DataFrame(rows), tmp_path, DatasetConfig(resolution=64, stage="pretrain"))
    for i, (w, h) in enumerate(EXPECTED):
        sample = square[i]
        assert sample["original_size"] == (h, w)
        assert list(sample["crop_top_left"]) == [2 * v for v in EXPECTED[(w, h)][2:4]]  # twice the 32 px crop
    # 200x90 -> bucket 192x64: resized to 192x87 (the width binds), cropped at top (87 - 64) // 2 = 11
    sample = GroupDataset(pd.DataFrame(rows), tmp_path, DatasetConfig(resolution=128, stage="multi_ref"))[2]
    assert sample["target"].shape[-2:] == (64, 192)
    assert sample["original_size"] == (90, 200) and sample["crop_top_left"] == (11, 0)


def test_a_batch_without_size_records_gets_the_target_size():
    batch = {"target": torch.zeros(2, 3, 32, 48)}
    assert sdxl_time_ids(batch).tolist() == [[32, 48, 0, 0, 32, 48]] * 2


def test_tiny_scheduler_config_carries_the_real_sdxl_keys(tiny_models):
    """DDIM built from the tiny profile's scheduler config reads clip_sample / set_alpha_to_one false, as SDXL's."""
    from diffusers import DDIMScheduler

    real_file = resources.files("easyref") / "configs" / "real" / "sdxl" / "scheduler" / "scheduler_config.json"
    real = json.loads(real_file.read_text())
    tiny = json.loads((tiny_models / "sdxl" / "scheduler" / "scheduler_config.json").read_text())
    assert {k: tiny.get(k) for k in real if not k.startswith("_")} == {k: v for k, v in real.items() if k[0] != "_"}
    ddim = DDIMScheduler.from_config(tiny)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
