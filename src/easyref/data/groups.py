"""Which input rows are kept as distinct images of distinct groups: group-name collisions between sources, exact
duplicates and near duplicates.

Near duplicates are images of one group whose perceptual hashes (pHash, grey levels only) differ in at most
``near_duplicate_distance`` bits **and** whose colour signatures (mean colours of a 4x4 grid) differ by at most
``near_duplicate_colour_distance`` levels: a re-encode or a resize is caught, while the same layout in red, green and
blue is three different references.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.data.reasons import Reason
from easyref.errors import UserError

if TYPE_CHECKING:
    from easyref.data.outcome import Outcome
    from easyref.data.sources import InputRow

COLLISION_MODES = ("merge", "prefix", "error")
LISTED_COLLISIONS = 100


def resolve_collisions(rows: list[InputRow], sources: list[str], mode: str) -> tuple[list[InputRow], dict[str, Any]]:
    """Rows with group names that two sources share merged, prefixed with their source's name, or refused.

    Returns the rows and the record for ``stats.json`` (the mode, how many group names collided, the first 100).
    """
    owners: dict[str, set[str]] = {}
    for row in rows:
        if row.group and row.problem is None:
            owners.setdefault(row.group, set()).add(row.source)
    shared = sorted(group for group, names in owners.items() if len(names) > 1)
    record = {"mode": mode, "groups": len(shared), "names": shared[:LISTED_COLLISIONS]}
    if not shared or mode == "merge":
        return rows, record
    if mode == "error":
        examples = "; ".join(f"{g!r} in {', '.join(sorted(owners[g]))}" for g in shared[:3])
        raise UserError(
            f"{len(shared)} group name(s) appear in more than one source ({examples}); rename them, or set "
            f"ingest.group_collision to merge (one group) or prefix (one group per source)"
        )
    labels = source_labels(sources)
    collided = set(shared)
    renamed = [
        dataclasses.replace(row, group=f"{labels[row.source]}/{row.group}") if row.group in collided else row
        for row in rows
    ]
    return renamed, record


def source_labels(sources: list[str]) -> dict[str, str]:
    """A short name per source (the folder's or table's name), or the source as given where two short names clash."""
    short = {source: Path(source.rstrip("/")).stem or source for source in sources}
    taken = [name for name in short.values()]
    return {source: name if taken.count(name) == 1 else source for source, name in short.items()}


def reject_duplicates(rows: list[InputRow], outcomes: list[Outcome], max_bits: int, max_colour: int) -> list[Outcome]:
    """Reject exact duplicates (anywhere) and near duplicates (within a group); the first row in order is kept."""
    import numpy as np

    outcomes = list(outcomes)
    first: dict[str, int] = {}
    by_group: dict[str, list[int]] = {}
    for i, outcome in enumerate(outcomes):
        if outcome.image_id is None:
            continue
        if outcome.image_id in first:
            outcomes[i] = _duplicate(outcome, Reason.DUPLICATE, "the same image as", rows[first[outcome.image_id]])
            continue
        first[outcome.image_id] = i
        by_group.setdefault(rows[i].group, []).append(i)
    for members in by_group.values():
        hashes = np.array([int(outcomes[i].phash, 16) for i in members], dtype=np.uint64)
        colours = np.array([np.frombuffer(bytes.fromhex(outcomes[i].colour), np.uint8) for i in members], np.int16)
        dropped = np.zeros(len(members), dtype=bool)
        for a in range(len(members)):
            if dropped[a]:
                continue
            close = np.bitwise_count(hashes[a + 1 :] ^ hashes[a]) <= max_bits
            close &= np.abs(colours[a + 1 :] - colours[a]).max(axis=1, initial=0) <= max_colour
            for b in np.flatnonzero(close & ~dropped[a + 1 :]) + a + 1:
                dropped[b] = True
                outcomes[members[b]] = _duplicate(
                    outcomes[members[b]], Reason.NEAR_DUPLICATE, "nearly the same image as", rows[members[a]]
                )
    return outcomes


def _duplicate(outcome: Outcome, reason: Reason, what: str, kept: InputRow) -> Outcome:
    where = kept.uri if kept.row is None else f"row {kept.row} ({kept.uri})"
    return dataclasses.replace(outcome, reason=str(reason), message=f"{what} {kept.source}: {where}, which is kept")
