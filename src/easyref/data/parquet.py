"""Deterministic file writing: the same rows give the same bytes, so DVC hashes only change when the data does."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` without schema metadata (no pandas version, no index), atomically."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = _tmp_name(path)
    pq.write_table(table.replace_schema_metadata(None), tmp, compression="zstd")
    os.replace(tmp, path)


def write_json(data: Any, path: str | Path) -> None:
    """Write ``data`` as indented JSON with sorted keys and a final newline, atomically."""
    path = Path(path)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tmp_name(path: Path) -> Path:
    """A temp name beside ``path`` that no other process (or thread) uses: pid and random bits."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
