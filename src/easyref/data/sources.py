"""Reading ingestion sources into input rows: folder trees and tables (parquet, jsonl, csv).

A *folder source* is a tree ``ROOT/<group>/<image>`` (the group is the image's folder path relative to ``ROOT``).
Captions come from ``ROOT/captions.jsonl`` (``{"image": "<group>/<file>", "caption": "..."}`` per line) or from a
sidecar ``<group>/<stem>.txt``. Hidden files, ``*.txt`` sidecars and ``captions.jsonl`` are not rows; every other
file is one (a stray ``notes.md`` is rejected as unreadable rather than silently skipped).

A *table source* is a ``.parquet``, ``.jsonl`` or ``.csv`` file with at least the columns ``image``, ``caption``
and ``group``; other columns are kept as JSON metadata. ``image`` is a path relative to the table's folder, an
absolute path, a ``file://``, ``s3://`` or ``http(s)://`` URI.

Local paths (relative, absolute, ``file://``, and symlinks in folder trees) must resolve inside the source's folder
or one of the ``allow_roots`` (``--allow-root``), and must be regular files: FIFOs, devices and sockets are rejected
from their ``stat`` alone, never opened. File and folder names that are not UTF-8 are rejected rows (their bytes
escaped). Control characters (NUL, ANSI escape sequences, bidirectional overrides) are stripped from captions and
group names, and the row records that it was cleaned. Problems found here (no caption, path escapes, missing file)
are recorded on the row, so that every row is accounted for.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from easyref.data.caption_files import CAPTIONS_FILE, clean_caption, folder_caption, read_captions_jsonl
from easyref.data.confine import escape, inside
from easyref.data.reasons import Reason, Rejection
from easyref.errors import UserError

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
    identity: tuple[int, int] | None = None
    """``(st_dev, st_ino)`` of a local file when it was listed: the fetch refuses another file found at the path."""


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
    cleaned: tuple[str, ...] = ()
    """The fields (``caption``, ``group``) that had control characters stripped."""

    @property
    def sort_key(self) -> tuple[str, int, str]:
        """The canonical order of rows: which of two duplicates is kept does not depend on argument order."""
        return (self.source, -1 if self.row is None else self.row, self.uri)


def read_source(source: str, *, max_caption_chars: int, allow_roots: tuple[str, ...] = ()) -> list[InputRow]:
    """All input rows of one source (a folder or a table file)."""
    path = Path(source)
    roots = tuple(Path(root).resolve() for root in allow_roots)
    if path.is_dir():
        return read_folder(source, max_caption_chars=max_caption_chars, allow_roots=roots)
    if path.is_file() and path.suffix in TABLE_SUFFIXES:
        return read_table(source, max_caption_chars=max_caption_chars, allow_roots=roots)
    if path.is_file():
        raise UserError(f"{source}: unsupported source; use a folder or a {', '.join(TABLE_SUFFIXES)} table")
    raise UserError(f"{source}: no such file or folder")


def read_folder(source: str, *, max_caption_chars: int, allow_roots: tuple[Path, ...] = ()) -> list[InputRow]:
    """The rows of a folder tree ``ROOT/<group>/<image>``."""
    root = Path(source)
    real_roots = (root.resolve(), *allow_roots)

    captions = read_captions_jsonl(root / CAPTIONS_FILE, real_roots, max_caption_chars)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():  # os.walk does not follow it; an escaping link is still a row
                dirnames.remove(name)
                if not inside(real_roots, (here / name).resolve()):
                    rel = (here / name).relative_to(root).as_posix()
                    rows.append(_folder_row(source, rel, "", None, escape(rel)))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(".txt") or (here == root and name == CAPTIONS_FILE):
                continue
            file = here / name
            rel = file.relative_to(root).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                escaped = os.fsencode(rel).decode("utf-8", "backslashreplace")
                problem = Rejection(Reason.BAD_NAME, f"the name {escaped} is not UTF-8; rename it")
                rows.append(_folder_row(source, escaped, "", None, problem))
                continue
            try:
                caption = folder_caption(file, captions.get(rel), max_caption_chars, real_roots, rel)
                caption, cleaned = strip_controls(caption)
                location = _local(file, real_roots, rel)
                rows.append(_folder_row(source, rel, caption, location, None, ("caption",) if cleaned else ()))
            except Rejection as problem:
                rows.append(_folder_row(source, rel, "", None, problem))
    return rows


def read_table(source: str, *, max_caption_chars: int, allow_roots: tuple[Path, ...] = ()) -> list[InputRow]:
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
    real_roots = (path.parent.resolve(), *allow_roots)
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        image = record["image"]
        uri = image if isinstance(image, str) else ""
        metadata = json.dumps({c: _plain(record[c]) for c in extra}, sort_keys=True, ensure_ascii=False)
        cleaned: tuple[str, ...] = ()
        try:
            group, group_cleaned = strip_controls(clean_group(record["group"]), Reason.BAD_GROUP)
            caption, caption_cleaned = strip_controls(clean_caption(record["caption"], max_caption_chars))
            cleaned = tuple(name for name, hit in (("caption", caption_cleaned), ("group", group_cleaned)) if hit)
            location = resolve_uri(uri, path.parent, real_roots)
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
                cleaned=cleaned,
            )
        )
    return rows


def resolve_uri(uri: str, base: Path, real_roots: tuple[Path, ...]) -> Location:
    """The location of a table's ``image`` value; relative paths resolve against ``base``, and every local path
    must stay inside one of ``real_roots`` (the table's folder and the allowed roots)."""
    if not uri.strip():
        raise Rejection(Reason.MISSING_FILE, "the image value is empty")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        return Location(scheme="s3", target=uri, fingerprint=uri)
    if scheme in ("http", "https"):
        return Location(scheme="http", target=uri, fingerprint=uri)
    if scheme == "file":
        return _local(Path(unquote(parsed.path)), real_roots, uri)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise Rejection(
            Reason.FETCH_FAILED, f"unsupported URI scheme {scheme!r}; use a path, file://, s3:// or http(s)://"
        )
    path = Path(uri)
    return _local(path if path.is_absolute() else base / path, real_roots, uri)


def clean_group(value: Any) -> str:
    """The group key as text (numbers become their decimal form); a missing, empty or non-scalar group is rejected."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, bool) or not isinstance(value, str | int | float | None):
        raise Rejection(
            Reason.BAD_GROUP, f"the group is a {type(value).__name__} ({str(value)[:80]}), not a text or number"
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Rejection(Reason.BAD_GROUP, "no group")
    group = " ".join(str(value).split())
    if not group:
        raise Rejection(Reason.BAD_GROUP, "the group is empty")
    return group


def strip_controls(text: str, reason: Reason = Reason.BAD_CAPTION) -> tuple[str, bool]:
    """``text`` without ANSI escape sequences, control and bidirectional-override characters, whitespace collapsed;
    and whether anything was removed. Text of nothing but such characters is rejected with ``reason``."""
    stripped = _CONTROLS.sub("", _ANSI.sub("", text))
    collapsed = " ".join(stripped.split())
    if not collapsed:
        raise Rejection(reason, f"nothing but control characters: {text[:40].encode('unicode_escape').decode()}")
    return collapsed, stripped != text


_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _folder_row(
    source: str,
    rel: str,
    caption: str,
    location: Location | None,
    problem: Rejection | None,
    cleaned: tuple[str, ...] = (),
) -> InputRow:
    group = PurePosixPath(rel).parent.as_posix()
    if problem is None and group != ".":
        try:
            group, group_cleaned = strip_controls(group, Reason.BAD_GROUP)
            cleaned = (*cleaned, "group") if group_cleaned else cleaned
        except Rejection as exc:
            problem = exc
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
        cleaned=cleaned,
    )


def _local(path: Path, real_roots: tuple[Path, ...], uri: str) -> Location:
    """A local regular file's location; the resolved path (symlinks, ``..``) must stay inside one of ``real_roots``.

    Only ``stat`` is called: a FIFO, device or socket is rejected without being opened. The file's identity is
    recorded, so that the fetch refuses another file swapped in at the path later.
    """
    real = path.resolve()
    if not inside(real_roots, real):
        raise escape(uri)
    try:
        info = os.stat(real, follow_symlinks=False)
    except OSError:
        raise Rejection(Reason.MISSING_FILE, f"no such file: {uri}") from None
    if not stat.S_ISREG(info.st_mode):
        raise Rejection(Reason.UNREADABLE, f"{uri} is not a regular file (a folder, FIFO, device or socket)")
    return Location(
        scheme="file",
        target=str(path),
        fingerprint=f"{info.st_size}:{info.st_mtime_ns}",
        identity=(info.st_dev, info.st_ino),
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
