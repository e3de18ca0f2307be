"""Pack a split table's images into sequential training shards (``easyref pack``), in a local folder or on S3.

  easyref pack --split data/split/train.parquet --image-root data/ingested --out data/shards
  easyref pack --split data/split/train.parquet --image-root data/ingested --out s3://bucket/easyref/shards

Each group becomes one WebDataset sample (its images' bytes unchanged plus a JSON record); groups are written in
the order of their first row in the table, a new shard starting when the next group would pass ``--shard-mb``. See
:mod:`easyref.data.shards` for the layout and the dataset that trains from it (``easyref train --data <out>``).

Re-runs write the same bytes (tar headers carry no time, owner or mode of this machine). ``shards.json`` is replaced
by an incomplete marker before anything else is written and by the complete one last, so a reader never trains on a
half-written or mixed set. A local ``--out`` is locked for the run; an S3 prefix is not (run one pack per prefix).
Memory stays bounded: the table is read as Arrow columns, groups are streamed one batch of rows at a time, and a
shard is written to disk (and uploaded) as it fills.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from easyref.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from easyref.data.shard_store import Store

HELP = "pack a split table's images into sequential training shards (WebDataset tar) in a folder or on S3"
BATCH_ROWS = 8192


@dataclass(kw_only=True)
class PackConfig:
    """The ``pack`` section of ``params.yaml``; command-line flags override it."""

    shard_mb: float = 512.0
    """A new shard starts when the next group would make this one larger (a group larger than this gets its own)."""

    def __post_init__(self) -> None:
        if not self.shard_mb > 0:
            raise ValueError(f"shard_mb must be positive, got {self.shard_mb}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", type=Path, required=True, help="the split table, e.g. data/split/train.parquet")
    parser.add_argument("--image-root", type=Path, required=True, help="folder the table's image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--params", type=Path, help="read defaults from the 'pack' section of this params.yaml")
    parser.add_argument("--shard-mb", type=float, help="largest shard in MB (default 512)")
    parser.add_argument("--s3-endpoint", help="S3 API endpoint URL (default: AWS_ENDPOINT_URL or AWS)")


def run(args: argparse.Namespace) -> int:
    import contextlib

    from easyref.config import load_section
    from easyref.data.shard_store import is_s3
    from easyref.locking import FolderLocked, output_lock

    config = load_section(PackConfig, args.params, "pack", {"shard_mb": args.shard_mb})
    lock = contextlib.nullcontext() if is_s3(args.out) else output_lock(args.out, "pack")
    try:
        with lock:
            marker = pack(args.split, args.image_root, args.out, config, endpoint=args.s3_endpoint)
    except FolderLocked as exc:
        raise UserError(str(exc)) from None
    print(
        f"pack: {marker['images']} images in {marker['groups']} groups -> {len(marker['shards'])} shards "
        f"({sum(s['bytes'] for s in marker['shards']) / 1e6:.1f} MB) in {args.out}"
    )
    return 0


class _ShardWriter:
    """One tar shard being written to a local temp file, hashed as it is written.

    Headers come from ``tarfile.TarInfo`` (ustar, no time, owner or mode of this machine); the members and the end of
    the archive are laid out as ``tarfile`` lays them out, without its per-member copies."""

    def __init__(self, folder: Path, number: int):
        from easyref.data.shards import shard_name

        self.name, self.path = shard_name(number), folder / f".{shard_name(number)}.tmp"
        self.fh: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.digest = hashlib.sha256()
        self.offset = self.groups = self.images = 0

    def _write(self, data: bytes) -> None:
        self.digest.update(data)
        self.fh.write(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Append a member; returns the offset of its data."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        start = self.offset
        self._write(data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
        return start

    def close(self) -> dict[str, Any]:
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end-of-archive blocks, then padding to a whole record
        self._write(end + tarfile.NUL * (-(self.offset + len(end)) % tarfile.RECORDSIZE))
        self.fh.close()
        return {"name": self.name, "bytes": self.offset, "sha256": self.digest.hexdigest(),
                "groups": self.groups, "images": self.images}


def _read_table(split: Path) -> pa.Table:
    import pyarrow.parquet as pq

    from easyref.data import commit
    from easyref.data.dataset import COLUMNS

    if not split.is_file():
        raise UserError(f"--split {split}: no such file; pass the split table (e.g. data/split/train.parquet)")
    commit.check(split)
    try:
        names = pq.read_schema(split).names
        missing = [c for c in COLUMNS if c not in names]
        table = None if missing else pq.read_table(split, columns=list(COLUMNS))
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UserError(f"--split {split}: not a readable parquet table ({exc})") from None
    if table is None:
        raise UserError(f"--split {split}: missing column(s) {missing}; pass a table written by easyref split")
    if table.num_rows == 0:
        raise UserError(f"--split {split}: no images to pack")
    return table


def pack(split: Path, image_root: Path, out: str, config: PackConfig, endpoint: str | None = None) -> dict[str, Any]:
    """Write ``split``'s images (paths relative to ``image_root``) as shards to ``out``; returns ``shards.json``."""
    import numpy as np
    import pyarrow as pa

    from easyref.data import commit
    from easyref.data.parquet import sha256_file
    from easyref.data.shard_store import is_s3, open_store
    from easyref.data.shards import FORMAT, INDEX, MARKER

    split, image_root = Path(split), Path(image_root)
    table = _read_table(split)
    commit.check_complete(image_root)
    store = open_store(out, endpoint)
    local = None if is_s3(out) else Path(out)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    base = {"format": FORMAT, "command": "easyref pack", "complete": False}
    store.put_bytes(MARKER, _json(base))
    codes = table.column("group").combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")  # rows group by group, groups by first row
    location = {c: np.zeros(table.num_rows, dtype=np.int64) for c in ("shard", "offset", "size", "group_offset",
                                                                     "group_size")}
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=local) as tmp:
        grouped = table if (np.diff(order) == 1).all() else table.take(pa.array(order))  # a split's rows: grouped
        shards = _write_shards(grouped, order, codes[order], image_root, store, Path(tmp),
                               int(config.shard_mb * 1_000_000), location)
        del grouped
        index = table.append_column("shard", pa.array(location["shard"], pa.int32()))
        for name in ("offset", "size", "group_offset", "group_size"):
            index = index.append_column(name, pa.array(location[name], pa.int64()))
        from easyref.data.parquet import write_parquet

        write_parquet(index, Path(tmp) / INDEX)
        index_sha = sha256_file(Path(tmp) / INDEX)
        store.put_file(Path(tmp) / INDEX, INDEX)
    marker = base | {
        "complete": True, "groups": int(codes.max()) + 1, "images": table.num_rows, "shard_mb": config.shard_mb,
        "shards": shards, "index": {"name": INDEX, "sha256": index_sha},
        "source": {"table": split.name, "sha256": sha256_file(split)},
    }  # fmt: skip
    store.put_bytes(MARKER, _json(marker))
    return marker


def _write_shards(
    rows: pa.Table,
    order: np.ndarray,
    codes: np.ndarray,
    image_root: Path,
    store: Store,
    tmp: Path,
    shard_bytes: int,
    location: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Stream ``rows`` (group by group, ``order`` their table rows) into shards; fill ``location`` per table row."""
    shards: list[dict[str, Any]] = []
    writer = _ShardWriter(tmp, 0)
    pending: list[tuple[int, dict[str, Any], bytes]] = []  # the group being collected: (table row, record, bytes)
    position = number = 0

    def flush() -> None:
        nonlocal writer, number
        key, number = f"{number:09d}", number + 1  # a WebDataset key: no dot
        record: dict[str, Any] = {"group": pending[0][1]["group"], "images": []}
        members = [(-1, f"{key}.json", b"")]
        for i, (row, meta, data) in enumerate(pending):
            member = f"{key}.{i}{Path(meta['path']).suffix.lower() or '.img'}"
            record["images"].append({k: meta[k] for k in ("image_id", "caption", "width", "height", "path")}
                                    | {"member": member})
            members.append((row, member, data))
        members[0] = (-1, members[0][1], _json(record))
        # the group's members, padded, and the most the end of the archive can add: no shard passes shard_bytes
        # unless one group alone does
        size = sum(tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for *_, data in members)
        if writer.offset and writer.offset + size + 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE > shard_bytes:
            shards.append(writer.close())
            store.put_file(writer.path, writer.name)
            writer = _ShardWriter(tmp, len(shards))
        first = None
        for row, member, data in members:
            start = writer.add(member, data)
            if row >= 0:
                first = start if first is None else first
                location["shard"][row], location["offset"][row], location["size"][row] = len(shards), start, len(data)
        for row, *_ in members[1:]:
            location["group_offset"][row], location["group_size"][row] = first, writer.offset - first
        writer.groups += 1
        writer.images += len(members) - 1
        pending.clear()

    for batch in rows.to_batches(max_chunksize=BATCH_ROWS):
        for meta in batch.to_pylist():
            code = codes[position]
            if pending and codes[position - 1] != code:
                flush()
            pending.append((int(order[position]), meta, _image_bytes(image_root, meta)))
            position += 1
    flush()
    shards.append(writer.close())
    store.put_file(writer.path, writer.name)
    return shards


def _image_bytes(image_root: Path, meta: dict[str, Any]) -> bytes:
    path = image_root / str(meta["path"])
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"{path}: cannot read image {meta['image_id']} of group {meta['group']} ({exc.strerror}); check "
            "--image-root (the ingest folder the table's paths are relative to) or re-run easyref ingest"
        ) from None


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
