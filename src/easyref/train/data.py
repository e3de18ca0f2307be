"""What the trainer reads: samples, a resumable global data order, and the dataset behind ``--data``.

A *sample* is a mapping with ``references`` (list of PIL images, the group), ``target`` (float tensor ``(3, H, W)``
in [-1, 1]) and ``caption`` (str), and optionally ``original_size`` (height, width of the image the target was
cut from) and ``crop_top_left`` (top, left of the crop in the resized image): SDXL's size and crop conditioning,
read into its time ids as SDXL was trained (without them: the target size and (0, 0)). Any
``torch.utils.data.Dataset`` of such samples can be trained on.

The data order is a pure function of ``(seed, step)``: optimizer step ``s`` consumes global positions
``[s * G, (s + 1) * G)`` (``G`` = global batch) of an endless sequence of per-epoch permutations. A resumed run
therefore continues the exact order from its checkpoint's step, whatever the world size. Each key the sampler
yields also says which optimizer step and micro-step it belongs to, so the collate function (in a DataLoader worker)
can draw that micro-step's CFG drops and prepare the MLLM inputs (:class:`easyref.train.recipe.PrepareBatch`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from easyref.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class SampleKey(NamedTuple):
    """Where a sample sits in the global order: which epoch's permutation, which dataset index, and the optimizer step
    and micro-step that read it."""

    epoch: int
    index: int
    step: int
    micro: int


class GlobalOrderSampler(Sampler[SampleKey]):
    """The dataset indices one rank reads from ``start_step`` to ``max_steps``, micro-batch by micro-batch.

    Within a step, micro-step ``m`` of rank ``r`` takes positions ``base + (m * W + r) * B + [0, B)``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        start_step: int,
        max_steps: int,
    ):
        if num_samples < 1:
            raise UserError("the training dataset is empty")
        self.n, self.seed = num_samples, seed
        self.batch, self.accum, self.rank, self.world = batch_size, grad_accum, rank, world_size
        self.start_step, self.max_steps = start_step, max_steps
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch * self.accum * self.world

    def position_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch][offset]

    def keys_for_step(self, step: int) -> list[SampleKey]:
        """This rank's keys of optimizer step ``step``, micro-batch after micro-batch."""
        base = step * self.global_batch
        out = []
        for m in range(self.accum):
            first = base + (m * self.world + self.rank) * self.batch
            out.extend(
                SampleKey(p // self.n, self.position_index(p), step, m) for p in range(first, first + self.batch)
            )
        return out

    def indices_for_step(self, step: int) -> list[int]:
        return [key.index for key in self.keys_for_step(step)]

    def __iter__(self) -> Iterator[SampleKey]:
        """Keys in reading order; :class:`EpochIndexed` turns them into samples of that epoch."""
        for step in range(self.start_step, self.max_steps):
            yield from self.keys_for_step(step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.batch * self.accum

    def state(self, step: int) -> dict[str, Any]:
        """Data-order state after ``step`` optimizer steps (what a checkpoint records)."""
        return {
            "seed": self.seed,
            "num_samples": self.n,
            "global_batch": self.global_batch,
            "samples_seen": step * self.global_batch,
            "epoch": step * self.global_batch // self.n,
        }


class EpochIndexed(Dataset):
    """Reads :class:`SampleKey` keys: sets the epoch of datasets whose sampling depends on it, indexes, and records
    the key's ``(step, micro)`` in the sample as ``position``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(key.epoch)
        return {**self.dataset[key.index], "position": (key.step, key.micro)}


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack targets; keep reference groups and captions as lists; ``original_size`` and ``crop_top_left`` as
    ``(batch, 2)`` tensors when the samples carry them (SDXL's time ids)."""
    from easyref.data.dataset import size_conditioning

    return {
        "references": [list(s["references"]) for s in samples],
        "target": torch.stack([s["target"] for s in samples]),
        "caption": [str(s["caption"]) for s in samples],
        **size_conditioning(samples),
    }


class FolderGroups(Dataset):
    """A folder of groups (``<group>/<image>`` + ``captions.jsonl``, the ``easyref demo-data`` layout).

    Every image is a target once; its references are the other images of its group (at most ``max_references``).
    """

    def __init__(self, root: str | Path, resolution: int, max_references: int = 28):
        self.root = Path(root)
        captions_file = self.root / "captions.jsonl"
        if not captions_file.is_file():
            raise UserError(f"{self.root}: expected captions.jsonl beside the group folders")
        captions: dict[str, str] = {}
        for line_no, line in enumerate(captions_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["image"]] = row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(
                    f'{captions_file}:{line_no}: expected {{"image": ..., "caption": ...}} ({exc})'
                ) from exc
        self.groups: dict[str, list[str]] = {}
        for group in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = sorted(f"{group.name}/{f.name}" for f in group.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if len(images) >= 2:
                self.groups[group.name] = images
        self.items = [(g, i) for g, images in self.groups.items() for i in range(len(images))]
        if not self.items:
            raise UserError(f"{self.root}: no group folder with at least two images")
        self.captions, self.resolution, self.max_references = captions, resolution, max_references

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, rel: str) -> Any:
        from PIL import Image

        with Image.open(self.root / rel) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int) -> dict[str, Any]:
        group, i = self.items[index]
        images = self.groups[group]
        from easyref.data.dataset import center_crop, to_tensor

        refs = [r for j, r in enumerate(images) if j != i][: self.max_references]
        image = self._open(images[i])
        target, corner = center_crop(image, (self.resolution, self.resolution))
        return {
            "references": [self._open(r) for r in refs],
            "target": to_tensor(target),
            "caption": self.captions.get(images[i], ""),
            "group": group,
            "original_size": (image.height, image.width),
            "crop_top_left": corner,
        }


def build_dataset(
    path: str | Path, *, stage: str, resolution: int, max_references: int, image_root: str | Path, seed: int = 0
) -> Dataset:
    """The dataset behind ``--data``: a split table (``.parquet``, read by :class:`easyref.data.dataset.GroupDataset`
    with image paths relative to ``image_root``), a packed set of shards (a folder or ``s3://`` prefix with
    ``shards.json``, read by :class:`easyref.data.shards.ShardDataset`: the split table's samples) or a folder of
    groups (:class:`FolderGroups`)."""
    from easyref.data.dataset import DatasetConfig, GroupDataset
    from easyref.data.shards import ShardDataset, is_shards

    shards = is_shards(path)
    if not shards:
        path = Path(path)
        if path.is_dir() and (path / "captions.jsonl").is_file():
            return FolderGroups(path, resolution, max_references)
        if not path.is_file():
            raise UserError(
                f"--data {path}: no such split table (.parquet), packed set (with shards.json) or folder of groups "
                "(with captions.jsonl)"
            )
    try:
        config = DatasetConfig(stage=stage, resolution=resolution, max_refs=max_references, seed=seed)
    except ValueError as exc:
        raise UserError(f"--data {path}: {exc}") from exc
    return ShardDataset(path, config) if shards else GroupDataset(path, image_root, config)


def dataset_fingerprint(path: str | Path) -> str:
    """A short content hash of the training data, for the MLflow tag and the resume check.

    A split table: its bytes (it records each image's hash). A packed set: its ``shards.json`` (every shard's and
    the index's SHA-256). A folder of groups: ``captions.jsonl`` plus the name and size of every image file, so
    adding, removing or replacing an image changes it.
    """
    import hashlib

    from easyref.data.shards import fingerprint, is_shards

    if is_shards(path):
        return fingerprint(path)
    path = Path(path)
    file = path / "captions.jsonl" if path.is_dir() else path
    if not file.is_file():
        return "none"
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if path.is_dir():
        for image in sorted(p for p in path.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES):
            digest.update(f"\0{image.relative_to(path).as_posix()}\0{image.stat().st_size}".encode())
    return digest.hexdigest()[:16]
