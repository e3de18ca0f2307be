"""Reading ingestion sources into input rows: folder trees and tables (parquet, jsonl, csv).

A *folder source* is a tree ``ROOT/<group>/<image>`` (the group is the image's folder path relative to ``ROOT``).
Captions come from ``ROOT/captions.jsonl`` (``{"image": "<group>/<file>", "caption": "..."}`` per line) or from a
sidecar ``<group>/<stem>.txt``. Hidden files, ``*.txt`` sidecars and ``captions.jsonl`` are not rows; every other
file is one (a stray ``notes.md`` is rejected as unreadable rather than silently skipped).

A *table source* is a ``.parquet``, ``.jsonl`` or ``.csv`` file with at least the columns ``image``, ``caption``
and ``group``; other columns are kept as JSON metadata. ``image`` is a path relative to the table's folder, an
absolute path, a ``file://``, ``s3://`` or ``http(s)://`` URI.

Relative paths (and symlinks in folder trees) must stay inside the source's folder. Problems found here (no
caption, path escapes, missing file) are recorded on the row, so that every row is accounted for.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from easyref.data.reasons import Reason, Rejection
from easyref.errors import UserError

CAPTIONS_FILE = "captions.jsonl"
TABLE_SUFFIXES = (".parquet", ".jsonl", ".csv")
REQUIRED_COLUMNS = ("image", "caption", "group")


@dataclass(frozen=True, kw_only=True)
class Location:
    """Where an image's bytes are and how to fetch them."""

    scheme: Literal["file", "s3", "http"]
    """``file`` for local paths (``target`` is the path), ``s3`` and ``http`` for URIs (``target`` is the URI)."""
    target: str
    fingerprint: str
    """Changes when the content may have changed: ``size:mtime_ns`` for files, the URI for remote objects."""


@dataclass(frozen=True, kw_only=True)
class InputRow:
    """One input row of a source, before its image is fetched."""

    source: str
    """The source as named on the command line."""
    row: int | None
    """The 0-based row number in a table source; ``None`` for folder sources."""
    uri: str
    """The image as the source names it: the path relative to a folder source, or a table's ``image`` value."""
    group: str
    caption: str
    metadata: str
    """Extra table columns as a JSON object with sorted keys (``{}`` for folder sources)."""
    location: Location | None
    """``None`` when ``problem`` is set."""
    problem: Rejection | None = None

    @property
    def sort_key(self) -> tuple[str, int, str]:
        """The canonical order of rows: which of two duplicates is kept does not depend on argument order."""
        return (self.source, -1 if self.row is None else self.row, self.uri)


def read_source(source: str, *, max_caption_chars: int) -> list[InputRow]:
    """All input rows of one source (a folder or a table file)."""
    path = Path(source)
    if path.is_dir():
        return read_folder(source, max_caption_chars=max_caption_chars)
    if path.is_file() and path.suffix in TABLE_SUFFIXES:
        return read_table(source, max_caption_chars=max_caption_chars)
    if path.is_file():
        raise UserError(f"{source}: unsupported source; use a folder or a {', '.join(TABLE_SUFFIXES)} table")
    raise UserError(f"{source}: no such file or folder")


def read_folder(source: str, *, max_caption_chars: int) -> list[InputRow]:
    """The rows of a folder tree ``ROOT/<group>/<image>``."""
    root = Path(source)
    real_root = root.resolve()
    captions = _read_captions_jsonl(root / CAPTIONS_FILE)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():  # os.walk does not follow it; an escaping link is still a row
                dirnames.remove(name)
                if not _inside(real_root, (here / name).resolve()):
                    rel = (here / name).relative_to(root).as_posix()
                    rows.append(_folder_row(source, rel, "", None, _escape(rel)))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(".txt") or (here == root and name == CAPTIONS_FILE):
                continue
            file = here / name
            rel = file.relative_to(root).as_posix()
            try:
                caption = _folder_caption(file, captions.get(rel), max_caption_chars)
                rows.append(_folder_row(source, rel, caption, _local(file, real_root, rel), None))
            except Rejection as problem:
                rows.append(_folder_row(source, rel, "", None, problem))
    return rows


def read_table(source: str, *, max_caption_chars: int) -> list[InputRow]:
    """The rows of a parquet / jsonl / csv table with ``image``, ``caption`` and ``group`` columns."""
    import pandas as pd

    path = Path(source)
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise UserError(f"{source}: cannot read the table: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)}; a table source needs {', '.join(REQUIRED_COLUMNS)} "
            f"(found: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    extra = sorted(str(c) for c in frame.columns if c not in REQUIRED_COLUMNS)
    real_base = path.parent.resolve()
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        image = record["image"]
        uri = image if isinstance(image, str) else ""
        metadata = json.dumps({c: _plain(record[c]) for c in extra}, sort_keys=True, ensure_ascii=False)
        try:
            group = clean_group(record["group"])
            caption = clean_caption(record["caption"], max_caption_chars)
            location = resolve_uri(uri, path.parent, real_base)
            problem = None
        except Rejection as exc:
            group, caption, location, problem = _text(record["group"]), _text(record["caption"]), None, exc
        rows.append(
            InputRow(
                source=source,
                row=index,
                uri=uri,
                group=group,
                caption=caption,
                metadata=metadata,
                location=location,
                problem=problem,
            )
        )
    return rows


def resolve_uri(uri: str, base: Path, real_base: Path) -> Location:
    """The location of a table's ``image`` value; relative paths resolve against (and must stay in) ``base``."""
    if not uri.strip():
        raise Rejection(Reason.MISSING_FILE, "the image value is empty")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        return Location(scheme="s3", target=uri, fingerprint=uri)
    if scheme in ("http", "https"):
        return Location(scheme="http", target=uri, fingerprint=uri)
    if scheme == "file":
        return _local(Path(unquote(parsed.path)), None, uri)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise Rejection(
            Reason.FETCH_FAILED, f"unsupported URI scheme {scheme!r}; use a path, file://, s3:// or http(s)://"
        )
    path = Path(uri)
    if path.is_absolute():
        return _local(path, None, uri)
    return _local(base / path, real_base, uri)


def clean_caption(value: Any, max_chars: int) -> str:
    """The caption with whitespace collapsed; a missing, empty, non-text or too long caption is rejected."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Rejection(Reason.BAD_CAPTION, "no caption")
    if not isinstance(value, str):
        raise Rejection(Reason.BAD_CAPTION, f"the caption is a {type(value).__name__}, not text: {value!r}")
    caption = " ".join(value.split())
    if not caption:
        raise Rejection(Reason.BAD_CAPTION, "the caption is empty")
    if len(caption) > max_chars:
        raise Rejection(Reason.BAD_CAPTION, f"the caption has {len(caption)} characters, more than {max_chars}")
    return caption


def clean_group(value: Any) -> str:
    """The group key as text (numbers become their decimal form); a missing or empty group is rejected."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Rejection(Reason.BAD_GROUP, "no group")
    group = " ".join(str(value).split())
    if not group:
        raise Rejection(Reason.BAD_GROUP, "the group is empty")
    return group


def _folder_row(source: str, rel: str, caption: str, location: Location | None, problem: Rejection | None) -> InputRow:
    group = PurePosixPath(rel).parent.as_posix()
    if group == "." and problem is None:
        problem = Rejection(Reason.BAD_GROUP, "the file is directly in the source folder, not in a group folder")
    return InputRow(
        source=source,
        row=None,
        uri=rel,
        group="" if group == "." else group,
        caption=caption,
        metadata="{}",
        location=None if problem else location,
        problem=problem,
    )


def _folder_caption(file: Path, from_jsonl: str | None, max_chars: int) -> str:
    if from_jsonl is not None:
        return clean_caption(from_jsonl, max_chars)
    sidecar = file.with_suffix(".txt")
    if not sidecar.is_file():
        raise Rejection(Reason.BAD_CAPTION, f"no caption: add {sidecar.name} or a line in {CAPTIONS_FILE}")
    try:
        text = sidecar.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(Reason.BAD_CAPTION, f"{sidecar.name} is not UTF-8 text") from None
    return clean_caption(text, max_chars)


def _read_captions_jsonl(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    captions = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                captions[str(record["image"])] = record.get("caption")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(
                    f'{path}:{number}: expected a JSON object with "image" and "caption", got {line.strip()[:80]!r} ({exc})'
                ) from exc
    return captions


def _local(path: Path, real_base: Path | None, uri: str) -> Location:
    """A local file's location; with ``real_base``, the resolved path (symlinks, ``..``) must stay inside it."""
    if real_base is not None and not _inside(real_base, path.resolve()):
        raise _escape(uri)
    try:
        stat = path.stat()
    except OSError:
        raise Rejection(Reason.MISSING_FILE, f"no such file: {uri}") from None
    return Location(scheme="file", target=str(path), fingerprint=f"{stat.st_size}:{stat.st_mtime_ns}")


def _inside(real_base: Path, real_path: Path) -> bool:
    return real_path == real_base or real_base in real_path.parents


def _escape(uri: str) -> Rejection:
    return Rejection(
        Reason.PATH_ESCAPE, f"{uri} leads out of the source folder (a symlink or ../ path); copy the file in"
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _plain(value: Any) -> Any:
    """A JSON-serialisable form of a table cell (numpy scalars and arrays become Python values, NaN becomes null)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
