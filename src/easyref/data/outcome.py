"""What became of one image (:class:`Outcome`), and the tables of outcomes: the ingest cache and a shard's results.

A leaf module shared by :mod:`easyref.data.ingest`, :mod:`easyref.data.groups` and the shard / merge steps
(:mod:`easyref.data.ingest_shards`); it imports none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.data.reasons import Reason, Rejection

if TYPE_CHECKING:
    import pyarrow as pa

    from easyref.data.sources import Location

CACHE_FILE = ".cache/ingest.parquet"
INT_COLUMNS = {"row": "int64", "width": "int32", "height": "int32"}  # every other column is a string


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What became of one image: stored (``image_id`` set) or rejected (``reason`` set)."""

    image_id: str | None = None
    path: str | None = None
    width: int = 0
    height: int = 0
    phash: str = ""
    colour: str = ""
    reason: str | None = None
    message: str = ""


def rejected_outcome(problem: Rejection) -> Outcome:
    return Outcome(reason=str(problem.reason), message=problem.message)


def arrow_table(records: list[dict[str, Any]], columns: tuple[str, ...]) -> pa.Table:
    """An Arrow table with explicit column types (strings unless listed in ``INT_COLUMNS``), no pandas metadata."""
    import pyarrow as pa

    schema = pa.schema([(c, pa.type_for_alias(INT_COLUMNS.get(c, "string"))) for c in columns])
    return pa.Table.from_pylist(records, schema=schema)


def cache_key(location: Location, config_hash: str) -> str:
    """The key of one image's outcome: the settings that shape it, where the bytes are and their fingerprint."""
    return f"{config_hash}|{location.scheme}|{location.target}|{location.fingerprint}"


def read_outcomes(path: Path) -> dict[str, Outcome]:
    """The outcomes of a table written by :func:`write_outcomes`, by key."""
    import pyarrow.parquet as pq

    outcomes = {}
    for record in pq.read_table(path).to_pylist():
        key = record.pop("key")
        outcomes[key] = Outcome(**record)
    return outcomes


def write_outcomes(path: Path, outcomes: dict[str, Outcome]) -> None:
    """``outcomes`` as a parquet table (one row per key, sorted by key)."""
    from easyref.data.parquet import write_parquet

    records = [{"key": key, **dataclasses.asdict(outcome)} for key, outcome in sorted(outcomes.items())]
    columns = ("key", *(f.name for f in dataclasses.fields(Outcome)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(arrow_table(records, columns), path)


def load_cache(out: Path, config_hash: str) -> dict[str, Outcome]:
    """Cached outcomes for this config whose stored image (if any) still exists."""
    path = out / CACHE_FILE
    if not path.is_file():
        return {}
    return {
        key: outcome
        for key, outcome in read_outcomes(path).items()
        if key.startswith(f"{config_hash}|") and (outcome.path is None or (out / outcome.path).is_file())
    }


def save_cache(out: Path, outcomes: dict[str, Outcome], keys: set[str | None]) -> None:
    """Keep the outcomes of the current rows, except fetch failures (they may succeed next time)."""
    kept = {k: o for k, o in outcomes.items() if k in keys and o.reason != Reason.FETCH_FAILED}
    write_outcomes(out / CACHE_FILE, kept)
