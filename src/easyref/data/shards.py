"""Packed training shards: the format ``easyref pack`` writes and the dataset that trains from it.

A packed set is a local folder or an S3 prefix holding

- ``shard-000000.tar``, ...: WebDataset's tar layout (a sample is the members sharing a key), written with the
  standard library's ``tarfile``. One sample per *group*: ``<key>.json`` (group name; per image its id, caption,
  width, height and source path) and ``<key>.<i>.<ext>``, each image's ingested bytes unchanged. A group never
  straddles two shards and its members are contiguous, so one byte range holds all its images.
- ``index.parquet``: one row per image, in the split table's row order, with the split table's columns and where
  the image's bytes are (``shard``, ``offset``, ``size``) and its group's byte range (``group_offset``,
  ``group_size``).
- ``shards.json``, written last: the format, the counts, every shard's name, size and SHA-256, the index's SHA-256
  and the source split table's. A set without a complete ``shards.json`` is refused.

:class:`ShardDataset` is :class:`~easyref.data.dataset.GroupDataset` over the index: row ``i`` is the same
sample as row ``i`` of the split table, drawn with the same stage rules (pretrain: the group's other images;
single_ref; multi_ref truncation) from the same ``(seed, epoch, index)``. The trainer's global order therefore
reads the same samples in the same order from shards as from files (bit-identical losses, exact resume at any
world size), each rank and DataLoader worker fetching only the samples its share of the order names: one ranged
read per sample (the group's byte range), no shared file system.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.data.dataset import COLUMNS, DatasetConfig, GroupDataset
from easyref.data.shard_store import Store, is_s3, open_store
from easyref.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

FORMAT = "easyref-shards/1"
MARKER = "shards.json"
INDEX = "index.parquet"
LOCATION_COLUMNS = ("shard", "offset", "size", "group_offset", "group_size")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def is_shards(location: str | Path) -> bool:
    """Whether ``--data`` names a packed set: an ``s3://`` URL, a folder with ``shards.json``, or that file."""
    location = str(location)
    if is_s3(location):
        return True
    path = Path(location)
    return path.name == MARKER or (path / MARKER).is_file()


def set_location(location: str | Path) -> str:
    """The folder or prefix of a packed set, given it or its ``shards.json``."""
    location = str(location).rstrip("/")
    return location[: -len(MARKER)].rstrip("/") if location.endswith("/" + MARKER) or location == MARKER else location


def read_marker(store: Store) -> tuple[dict[str, Any], bytes]:
    """The set's ``shards.json`` (parsed and raw), refused unless complete and of this format."""
    if not store.exists(MARKER):
        raise UserError(f"{store.url(MARKER)}: no such file; write the set with easyref pack")
    raw = store.read(MARKER)
    try:
        marker = json.loads(raw)
        complete, version = marker["complete"], marker["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{store.url(MARKER)}: unreadable ({exc}); re-run easyref pack") from None
    if version != FORMAT:
        raise UserError(f"{store.url(MARKER)}: format {version!r}, this easyref reads {FORMAT!r}; re-run easyref pack")
    if complete is not True:
        raise UserError(f"{store.location} holds an incomplete easyref pack output (interrupted?); re-run easyref pack")
    return marker, raw


def fingerprint(location: str | Path) -> str:
    """A short hash of the set's ``shards.json`` (it records every shard's and the index's SHA-256)."""
    _, raw = read_marker(open_store(set_location(location)))
    return hashlib.sha256(raw).hexdigest()[:16]


class ShardDataset(GroupDataset):
    """The samples of a packed set (local folder or ``s3://`` prefix), identical to the split table's."""

    def __init__(self, location: str | Path, config: DatasetConfig, endpoint: str | None = None) -> None:
        import numpy as np
        import pandas as pd

        self.store = open_store(set_location(location), endpoint)
        marker, _ = read_marker(self.store)
        data = self.store.read(INDEX)
        if hashlib.sha256(data).hexdigest() != marker["index"]["sha256"]:
            raise UserError(f"{self.store.url(INDEX)} is not the index {self.store.url(MARKER)} records; re-run pack")
        frame = pd.read_parquet(io.BytesIO(data), columns=[*COLUMNS, *LOCATION_COLUMNS])
        super().__init__(frame, "", config)
        self.shard_names = [s["name"] for s in marker["shards"]]
        sizes = np.array([s["bytes"] for s in marker["shards"]], dtype=np.int64)
        self.shard = frame["shard"].to_numpy(dtype=np.int64)
        self.offset, self.size = frame["offset"].to_numpy(dtype=np.int64), frame["size"].to_numpy(dtype=np.int64)
        self.group_offset = frame["group_offset"].to_numpy(dtype=np.int64)
        self.group_size = frame["group_size"].to_numpy(dtype=np.int64)
        bad = (self.shard < 0) | (self.shard >= len(sizes))
        if not bad.any():
            bad = self.group_offset + self.group_size > sizes[self.shard]
        if bad.any():
            raise UserError(f"{self.store.url(INDEX)}: row {int(bad.argmax())} points outside its shard; re-run pack")
        self._span: tuple[tuple[int, int], bytes] = ((-1, -1), b"")

    def group_bytes(self, index: int) -> tuple[int, bytes]:
        """The byte range of row ``index``'s group and its start; the last one is kept (a sample's target and its
        references are one read)."""
        key = (int(self.shard[index]), int(self.group_offset[index]))
        if self._span[0] != key:
            name, size = self.shard_names[key[0]], int(self.group_size[index])
            data = self.store.read_range(name, key[1], size)
            if len(data) != size:
                raise UserError(f"{self.store.url(name)}: {len(data)} bytes at {key[1]}, expected {size}; re-run pack")
            self._span = (key, data)
        return key[1], self._span[1]

    def _load(self, index: int) -> Image.Image:
        from PIL import Image

        start, data = self.group_bytes(index)
        begin = int(self.offset[index]) - start
        try:
            with Image.open(io.BytesIO(data[begin : begin + int(self.size[index])])) as image:
                return image.convert("RGB")
        except OSError as exc:
            name = self.shard_names[int(self.shard[index])]
            raise UserError(
                f"{self.store.url(name)}: cannot read image {self.image_ids[index]} ({exc}); re-run easyref pack"
            ) from exc
