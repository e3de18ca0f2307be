"""Caption files of a folder source: ``<image stem>.txt`` sidecars and ``ROOT/captions.jsonl``.

Both are confined as images are (their resolved path must lie inside the source's folder or an ``--allow-root``),
opened at that resolved path without following links and non-blocking (regular files only), and read only as far as
the caption limit can use (:func:`caption_file_limit`): a longer sidecar is a ``bad_caption`` row, a longer line of
``captions.jsonl`` a one-line error naming it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from easyref.data.confine import escape, inside
from easyref.data.reasons import Reason, Rejection
from easyref.errors import UserError

CAPTIONS_FILE = "captions.jsonl"


def caption_file_limit(max_chars: int) -> int:
    """The most bytes of a caption file (``.txt`` sidecar, or a line of ``captions.jsonl``) worth reading: a caption
    of ``max_chars`` characters as JSON escapes (12 bytes for a character outside the BMP) with room for the
    image's path and whitespace. Anything longer is rejected without being read further."""
    return 12 * max_chars + 65536


def open_confined(path: Path, real_roots: tuple[Path, ...], uri: str) -> int:
    """A read-only descriptor of the regular file at ``path``, whose resolved path must lie inside ``real_roots``
    (as images' paths must). The resolved path is opened without following links (a symlink swapped in after the
    check is refused) and non-blocking (a FIFO cannot hang the read; only regular files are accepted)."""
    real = path.resolve()
    if not inside(real_roots, real):
        raise escape(uri)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise Rejection(Reason.MISSING_FILE, f"no such file: {uri}") from None
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"cannot read {uri}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Rejection(Reason.UNREADABLE, f"{uri} is not a regular file (a folder, FIFO, device or socket)")
    return fd


def folder_caption(file: Path, from_jsonl: str | None, max_chars: int, real_roots: tuple[Path, ...], rel: str) -> str:
    if from_jsonl is not None:
        return clean_caption(from_jsonl, max_chars)
    sidecar = file.with_suffix(".txt")
    if not sidecar.is_file():
        raise Rejection(Reason.BAD_CAPTION, f"no caption: add {sidecar.name} or a line in {CAPTIONS_FILE}")
    limit = caption_file_limit(max_chars)
    with open(open_confined(sidecar, real_roots, str(PurePosixPath(rel).with_suffix(".txt"))), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Rejection(
            Reason.BAD_CAPTION,
            f"{sidecar.name} has more than {limit} bytes, more than a caption of at most {max_chars} characters "
            f"(ingest.max_caption_chars) can use",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejection(Reason.BAD_CAPTION, f"{sidecar.name} is not UTF-8 text") from None
    return clean_caption(text, max_chars)


def read_captions_jsonl(path: Path, real_roots: tuple[Path, ...], max_chars: int) -> dict[str, Any]:
    """``{image: caption}`` of a folder's captions.jsonl, confined and bounded as sidecars are (one-line errors)."""
    if not path.is_file():
        return {}
    try:
        fd = open_confined(path, real_roots, str(path))
    except Rejection as exc:
        raise UserError(exc.message) from None
    limit = caption_file_limit(max_chars)
    captions = {}
    with open(fd, "rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(limit + 1), b""), start=1):
            if len(raw) > limit:
                raise UserError(
                    f"{path}:{number}: a line of more than {limit} bytes, more than a caption of at most {max_chars} "
                    f"characters (ingest.max_caption_chars) can use; shorten it"
                )
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                captions[str(record["image"])] = record.get("caption")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                shown = raw.strip()[:80].decode("utf-8", "backslashreplace")
                raise UserError(
                    f'{path}:{number}: expected a JSON object with "image" and "caption", got {shown!r} ({exc})'
                ) from None
    return captions


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
