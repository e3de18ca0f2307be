"""What ``easyref ingest`` may write and delete under its ``--out``: never a source, never a file it did not write.

``--out`` must not be a source, hold one, or lie inside a source folder (:func:`refuse_out_over_sources`, checked
before anything is created). Stale files under ``OUT/images`` are removed only when their names are the ones ingest
gives (``<id[:2]>/<id><suffix>`` with a 32-hex-digit content id, or the temp name of one) and no current row reads
them (:func:`remove_orphans`); any other file there is left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from easyref.data.images import SUFFIXES
from easyref.data.sources import InputRow
from easyref.errors import UserError


def refuse_out_over_sources(sources: list[str], out: Path) -> None:
    """Refuse an ``out`` that is a source, holds one or lies inside a source folder: ingest writes (and deletes its
    own stale files) under ``out``, and must never do so among the files it reads."""
    real_out = out.resolve()
    for source in sources:
        real = Path(source).resolve()
        if real == real_out or real_out in real.parents:
            raise UserError(
                f"--out {out} holds the source {source}: ingest writes and cleans up under --out; "
                f"choose an output folder outside every source (e.g. {real_out.parent / 'ingested'})"
            )
        if real.is_dir() and real in real_out.parents:
            raise UserError(
                f"--out {out} lies inside the source folder {source}: its outputs would be read as images next "
                f"time; choose an output folder outside every source"
            )


_SUFFIX = "|".join(re.escape(s.lstrip(".")) for s in SUFFIXES.values())
_OWN_FILE = re.compile(rf"(?P<id>[0-9a-f]{{32}})\.(?:{_SUFFIX})")
_OWN_TMP = re.compile(rf"\.(?P<id>[0-9a-f]{{32}})\.(?:{_SUFFIX})\.[0-9]+-[0-9a-f]{{8}}\.tmp")


def written_by_ingest(path: Path) -> bool:
    """Whether ``path`` (under ``OUT/images``) has a name :func:`easyref.data.ingest_work.process_image` gives: ``<id[:2]>/<id><suffix>``
    with a 32-hex-digit content id, or the temp name of one."""
    match = _OWN_FILE.fullmatch(path.name) or _OWN_TMP.fullmatch(path.name)
    return match is not None and path.parent.name == match["id"][:2]


def remove_orphans(out: Path, keep: set[str], rows: list[InputRow]) -> None:
    """Delete stored images no current row refers to (left over from sources no longer ingested, or temp files of a
    killed run). Only files named as ingest names them are candidates, never one a current row reads, and only
    under the folder's lock, so no other run's files are in flight."""
    reading = {os.path.realpath(r.location.target) for r in rows if r.location and r.location.scheme == "file"}
    for path in (out / "images").glob("*/*"):
        if path.relative_to(out).as_posix() in keep or not written_by_ingest(path):
            continue
        if (path.is_symlink() or path.is_file()) and os.path.realpath(path) not in reading:
            path.unlink()
