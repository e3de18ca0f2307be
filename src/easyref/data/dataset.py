"""The training dataset: (references, target, caption) samples drawn from image groups, per training stage.

Every image of a split table (``train.parquet``) is the target of one sample per epoch; its references come from
its group:

- ``pretrain`` (stage 1): up to ``max_refs`` other images of the group, in random order;
- ``single_ref`` (stage 2): exactly one image of the group, which may be the target itself (then augmented:
  random crop and horizontal flip);
- ``multi_ref`` (stage 3): the other images shuffled (at most ``max_refs``), and with probability
  ``truncate_prob`` truncated to a random 2..n-1 of them.

A group of one image uses its (augmented) target as the reference. Targets are float tensors in [-1, 1], CHW:
square centre crops at ``resolution`` for stages 1-2, and for stage 3 centre crops to the image's aspect-ratio
bucket (sides multiples of 64, area about ``resolution**2``); batch stage 3 with
:class:`easyref.data.batching.GroupBatchSampler` over :attr:`GroupDataset.bucket_ids` so that a batch shares one
size. References stay PIL images (the model's processor resizes them).

A split table is checked against its folder's commit marker (``easyref.data.commit``) before it is read, and the
image root must not be an ingest folder whose run is unfinished.

Randomness is a function of (seed, epoch, index) only, so samples do not depend on the worker or rank that loads
them; call :meth:`GroupDataset.set_epoch` before each epoch (with ``persistent_workers=False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np
from torch.utils.data import Dataset

from easyref.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from PIL import Image

Stage = Literal["pretrain", "single_ref", "multi_ref"]
COLUMNS = ("image_id", "path", "group", "caption", "width", "height")


@dataclass(kw_only=True)
class DatasetConfig:
    """How samples are drawn; one per training stage."""

    stage: Stage = "pretrain"
    """``pretrain`` (stage 1), ``single_ref`` (stage 2) or ``multi_ref`` (stage 3)."""
    resolution: int = 1024
    """Target side (stages 1-2) or the square root of the target area (stage 3)."""
    max_refs: int = 28
    """Most references per sample (stages 1 and 3)."""
    truncate_prob: float = 0.4
    """Stage 3: probability of truncating the shuffled references to a random 2..n-1 of them."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip when the target serves as its own reference."""
    min_crop: float = 0.8
    """Smallest side fraction of the random crop when the target serves as its own reference."""
    bucket_step: int = 64
    """Stage 3: bucket sides are multiples of this."""
    max_aspect: float = 4.0
    """Stage 3: the most elongated bucket (long side / short side)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution % self.bucket_step:
            raise ValueError(f"resolution {self.resolution} must be a multiple of bucket_step {self.bucket_step}")
        if self.max_refs < 1:
            raise ValueError(f"max_refs must be at least 1, got {self.max_refs}")
        if not 0 <= self.truncate_prob <= 1 or not 0 <= self.flip_prob <= 1:
            raise ValueError("truncate_prob and flip_prob must be probabilities in [0, 1]")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"min_crop must be in (0, 1], got {self.min_crop}")


class Sample(TypedDict):
    references: list[Image.Image]
    target: torch.Tensor
    caption: str
    group: str
    image_id: str
    original_size: tuple[int, int]
    """(height, width) of the image the target was cut from (SDXL's size conditioning)."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image (SDXL's crop conditioning)."""


class Batch(TypedDict):
    references: list[list[Image.Image]]
    """One list of PIL references per sample; the lengths may differ."""
    target: torch.Tensor
    """(batch, 3, height, width) in [-1, 1]."""
    caption: list[str]
    group: list[str]
    image_id: list[str]
    original_size: torch.Tensor
    """(batch, 2) long: (height, width) of each target's source image."""
    crop_top_left: torch.Tensor
    """(batch, 2) long: (top, left) of each target's crop."""


class GroupDataset(Dataset):
    """One sample per image of ``table`` (a split parquet file or a data frame with :data:`COLUMNS`)."""

    def __init__(self, table: str | Path | pd.DataFrame, image_root: str | Path, config: DatasetConfig) -> None:
        import pandas as pd

        if isinstance(table, str | Path):
            from easyref.data import commit

            commit.check(table)  # not a table of an interrupted split, nor one mixed in from another run
            commit.check_complete(image_root)  # not an ingest folder being written or left half-written
        frame = pd.read_parquet(table, columns=list(COLUMNS)) if isinstance(table, str | Path) else table
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise UserError(f"{table if isinstance(table, str | Path) else 'table'}: missing column(s) {missing}")
        if frame.empty:
            raise UserError(f"{table if isinstance(table, str | Path) else 'table'}: no images to train on")
        self.config = config
        self.image_root = Path(image_root)
        self.epoch = 0
        self.paths = frame["path"].to_numpy(dtype=object)
        self.captions = frame["caption"].to_numpy(dtype=object)
        self.groups = frame["group"].to_numpy(dtype=object)
        self.image_ids = frame["image_id"].to_numpy(dtype=object)
        codes, _ = pd.factorize(frame["group"])
        self._group_of = codes
        self._by_group = np.argsort(codes, kind="stable")  # row indices grouped, CSR style
        self._group_start = np.searchsorted(codes[self._by_group], np.arange(codes.max() + 2))
        if config.stage == "multi_ref":
            self.buckets = aspect_buckets(config.resolution, config.bucket_step, config.max_aspect)
            self.bucket_ids = nearest_bucket(frame["width"].to_numpy(), frame["height"].to_numpy(), self.buckets)
        else:
            self.buckets = [(config.resolution, config.resolution)]
            self.bucket_ids = np.zeros(len(frame), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples ``__getitem__`` draws."""
        self.epoch = epoch

    def group_members(self, index: int) -> np.ndarray:
        """Row indices of the images in the group of row ``index`` (including it)."""
        code = self._group_of[index]
        return self._by_group[self._group_start[code] : self._group_start[code + 1]]

    def reference_indices(self, index: int, rng: np.random.Generator) -> list[int]:
        """The rows used as references for target ``index``; the target's own row means "itself, augmented"."""
        members = self.group_members(index)
        others = members[members != index]
        stage, max_refs = self.config.stage, self.config.max_refs
        if stage == "single_ref":
            return [int(rng.choice(members))]
        if len(others) == 0:
            return [index]
        chosen = rng.permutation(others)[:max_refs]
        if stage == "multi_ref" and len(chosen) >= 3 and rng.random() < self.config.truncate_prob:
            chosen = chosen[: int(rng.integers(2, len(chosen)))]
        return [int(i) for i in chosen]

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        target = self._load(index)
        references = [
            self._augment(target, rng) if ref == index else self._load(ref)
            for ref in self.reference_indices(index, rng)
        ]
        cropped, corner = center_crop(target, self.buckets[self.bucket_ids[index]])
        return {
            "references": references,
            "target": to_tensor(cropped),
            "caption": str(self.captions[index]),
            "group": str(self.groups[index]),
            "image_id": str(self.image_ids[index]),
            "original_size": (target.height, target.width),
            "crop_top_left": corner,
        }

    def _load(self, index: int) -> Image.Image:
        from PIL import Image

        path = self.image_root / self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise UserError(
                f"{path}: cannot read image {self.image_ids[index]} ({exc}); re-run easyref ingest"
            ) from exc

    def _augment(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A random crop (side fraction ``min_crop``..1) resized back, flipped with ``flip_prob``."""
        from PIL import Image

        fraction = rng.uniform(self.config.min_crop, 1.0)
        w, h = max(1, round(image.width * fraction)), max(1, round(image.height * fraction))
        left, top = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
        image = image.resize(image.size, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < self.config.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def collate(samples: list[Sample]) -> Batch:
    """Batch samples: reference lists stay lists (their lengths may differ), targets are stacked."""
    import torch

    sizes = {tuple(s["target"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"targets of different sizes {sorted(sizes)} in one batch; batch with GroupBatchSampler")
    return {
        "references": [s["references"] for s in samples],
        "target": torch.stack([s["target"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "group": [s["group"] for s in samples],
        "image_id": [s["image_id"] for s in samples],
        **size_conditioning(samples),
    }


def size_conditioning(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``original_size`` and ``crop_top_left`` of a batch as ``(batch, 2)`` tensors, for SDXL's time ids; empty when
    a sample lacks them (a dataset that does not record them: the trainer then uses the target size and (0, 0))."""
    import torch

    if not samples or not all("original_size" in s and "crop_top_left" in s for s in samples):
        return {}
    return {
        "original_size": torch.tensor([[int(v) for v in s["original_size"]] for s in samples]),
        "crop_top_left": torch.tensor([[int(v) for v in s["crop_top_left"]] for s in samples]),
    }


def aspect_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) buckets: sides multiples of ``step``, the largest area up to ``resolution**2`` for each width,
    aspect ratios up to ``max_aspect``; sorted by aspect ratio (width / height), tallest first."""
    area = resolution * resolution
    buckets = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(widths: np.ndarray, heights: np.ndarray, buckets: list[tuple[int, int]]) -> np.ndarray:
    """Index of the bucket with the closest aspect ratio (in log space) for each image."""
    log_aspects = np.log([w / h for w, h in buckets])
    boundaries = (log_aspects[1:] + log_aspects[:-1]) / 2
    return np.searchsorted(boundaries, np.log(widths / heights)).astype(np.int64)


def center_crop(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize ``image`` to cover ``size`` (width, height), keeping its aspect ratio, and crop the centre; returns
    the crop and its top-left corner ``(top, left)`` in the resized image (SDXL's crop conditioning)."""
    from PIL import Image

    width, height = size
    if width * image.height >= height * image.width:  # the width binds; the other side rounds up (integers: exact)
        cover = (width, max(height, -(-image.height * width // image.width)))
    else:
        cover = (max(width, -(-image.width * height // image.height)), height)
    image = image.resize(cover, Image.Resampling.BICUBIC)
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    return image.crop((left, top, left + width, top + height)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A float32 CHW tensor in [-1, 1]."""
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
