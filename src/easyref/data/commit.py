"""Commit markers: an output folder's files are one unit, and readers never see a mixed or half-written set.

A writer (``easyref ingest``, ``easyref split``) calls :func:`begin` before it writes anything, which replaces
``commit.json`` with ``{"complete": false}``, and :func:`finish` after the last file is in place, which records the
SHA-256 of every file of the unit. A run killed in between leaves the folder marked incomplete. Readers call
:func:`check`: a file in a folder marked incomplete, or whose bytes differ from the recorded hash (a file from
another run beside it), is refused with a message that says which command to re-run. A folder without
``commit.json`` was not written by these commands (a hand-made table) and is read as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from easyref.errors import UserError

COMMIT_FILE = "commit.json"


def begin(folder: Path, what: str) -> None:
    """Mark ``folder`` as being written by ``easyref what`` (incomplete until :func:`finish`)."""
    from easyref.data.parquet import write_json

    write_json({"command": f"easyref {what}", "complete": False}, folder / COMMIT_FILE)


def finish(folder: Path, what: str, names: list[str]) -> None:
    """Mark ``folder`` complete, recording the SHA-256 of each of ``names`` (files in ``folder``)."""
    from easyref.data.parquet import sha256_file, write_json

    files = {name: sha256_file(folder / name) for name in sorted(names)}
    write_json({"command": f"easyref {what}", "complete": True, "files": files}, folder / COMMIT_FILE)


def check(path: str | Path) -> None:
    """Refuse ``path`` if its folder's commit marker says the unit is incomplete or holds other bytes for it."""
    path = Path(path)
    marker = path.parent / COMMIT_FILE
    if not marker.is_file():
        return
    try:
        info = json.loads(marker.read_text())
        command, complete, files = str(info["command"]), info["complete"], info.get("files", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{marker}: unreadable commit marker ({exc}); re-run the command that wrote {path.parent}"
        ) from None
    if complete is not True:
        raise UserError(
            f"{path.parent} holds an incomplete {command} output (interrupted, or still running); re-run {command}"
        )
    expected = files.get(path.name)
    if expected is not None:
        from easyref.data.parquet import sha256_file

        if not path.is_file() or sha256_file(path) != expected:
            raise UserError(
                f"{path} is not the file {command} committed in {marker} (outputs of different runs are mixed); "
                f"re-run {command}"
            )


def check_complete(folder: str | Path) -> None:
    """Refuse ``folder`` if its commit marker says a writer has not finished (no hashing: for image roots)."""
    check(Path(folder) / COMMIT_FILE)
