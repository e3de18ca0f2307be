"""Checkpoint integrity: every file of a training checkpoint has its SHA-256 recorded, and a resume verifies them.

``checksums.sha256`` (the ``sha256sum`` format, so ``sha256sum -c checksums.sha256`` checks a folder by hand) lists
every other file of the checkpoint, ``state.json`` and ``optimizer.json`` included. The checkpoint is written by
:class:`easyref.atomic.FolderWriter`: the listing is written last, after the files were flushed to disk (``fsync``),
and read back before the temp folder is renamed into place.

On resume :func:`pick_checkpoint` walks the checkpoints newest first and takes the first whose files all match.
A damaged one (truncated, edited, a file missing) is renamed ``damaged_step_NNNNNNNN`` with a warning, never
deleted, and the previous one is used. The checksums catch accidents and hand edits, not a writer who also rewrites
the checksum file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from easyref.atomic import damage as folder_damage
from easyref.errors import UserError

STATE_FILE = "state.json"
DAMAGED_PREFIX = "damaged_"


def damage(folder: Path) -> str | None:
    """Why the training checkpoint ``folder`` cannot be trusted (one line), or ``None`` when it verifies."""
    problem = folder_damage(folder, required=(STATE_FILE,))
    if problem is not None:
        return problem
    try:
        record = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} cannot be read ({exc})"
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return f"{STATE_FILE} has no integer step"
    return None


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the resume path (kept for inspection, never deleted)."""
    target = folder.with_name(DAMAGED_PREFIX + folder.name)
    n = 1
    while target.exists():
        target = folder.with_name(f"{DAMAGED_PREFIX}{folder.name}.{n}")
        n += 1
    folder.rename(target)
    return target


def pick_checkpoint(candidates: list[Path]) -> Path | None:
    """The newest intact checkpoint of ``candidates`` (oldest first); damaged newer ones are set aside with a warning.

    Raises :class:`UserError` when there are checkpoints but none is intact (nothing is moved then), rather than
    silently starting over.
    """
    reasons = []
    for folder in reversed(candidates):
        reason = damage(folder)
        if reason is None:
            for bad, why in reasons:
                moved = set_aside(bad)
                print(
                    f"warning: checkpoint {bad} is damaged ({why}); moved it to {moved.name} and resuming from "
                    f"{folder.name} instead",
                    file=sys.stderr,
                )
            return folder
        reasons.append((folder, reason))
    if reasons:
        listed = "; ".join(f"{p.name}: {why}" for p, why in reasons)
        raise UserError(
            f"{candidates[-1].parent}: no intact checkpoint to resume from ({listed}); restore one "
            "from a backup, or move the folder away to start the stage over"
        )
    return None
