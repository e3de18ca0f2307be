"""Ingest image sources (folder trees, parquet/jsonl/csv tables) into a manifest of image groups.

Sources: a folder ``ROOT/<group>/<image>`` with captions in ``ROOT/captions.jsonl`` or ``<image stem>.txt``
sidecars, or a table with ``image``, ``caption`` and ``group`` columns (other columns are kept as metadata).
Images may be paths, file://, s3:// (endpoint: --s3-endpoint or AWS_ENDPOINT_URL) or http(s):// URIs.

One run at a time per OUT: the folder is locked (``easyref.locking.output_lock``) for the whole run, and a second
``easyref ingest`` into it is refused with the holder's name.

Writes to OUT:
  images/<id[:2]>/<id>.jpg   normalised images (RGB, EXIF orientation applied, longest side capped), named by the
                             SHA-256 of their bytes
  manifest.parquet           one row per accepted image
  rejected.parquet           one row per rejected input row, with a reason code and a message
  stats.json, group_sizes.png
  commit.json                the SHA-256 of the four files above: they are one unit (``easyref.data.commit``), and
                             readers refuse a folder whose run was interrupted or whose files come from two runs
  .cache/ingest.parquet      per-image results, so that a re-run only processes new or changed images

Every input row lands in exactly one of manifest.parquet and rejected.parquet. Re-running on the same sources
writes byte-identical files. Exit status 2 when every row is rejected.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easyref.data.images import SUFFIXES
from easyref.data.ingest_config import IngestConfig
from easyref.data.outcome import Outcome, arrow_table, cache_key, load_cache, rejected_outcome, save_cache
from easyref.data.sources import InputRow
from easyref.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["IngestConfig", "IngestResult", "ingest"]

HELP = "ingest folder trees and tables of images into manifest.parquet / rejected.parquet"

OUTPUT_FILES = ("manifest.parquet", "rejected.parquet", "stats.json", "group_sizes.png")
HASH_VERSION = 2  # bump when the per-image outcome changes meaning (2: colour signature, imagehash's pHash)
MANIFEST_COLUMNS = (
    "image_id", "path", "group", "caption", "width", "height", "source", "row", "uri", "phash", "metadata",
)  # fmt: skip
REJECTED_COLUMNS = ("source", "row", "uri", "group", "caption", "reason", "message", "metadata")


@dataclass(frozen=True, kw_only=True)
class IngestResult:
    """Counts of one run; ``processed`` + ``cached`` images were looked at (rows may share an image)."""

    accepted: int
    rejected: int
    processed: int
    cached: int
    reasons: dict[str, int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="folder trees and/or parquet/jsonl/csv tables")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/ingested")
    parser.add_argument("--params", type=Path, help="read defaults from the 'ingest' section of this params.yaml")
    parser.add_argument("--workers", type=int, help="worker processes (default 2)")
    parser.add_argument("--max-side", type=int, help="cap on the longer side of stored images (default 1024)")
    parser.add_argument("--min-side", type=int, help="reject images whose shorter side is smaller (default 64)")
    parser.add_argument("--max-pixels", type=int, help="reject larger images without decoding (default 40M)")
    parser.add_argument("--format", choices=sorted(SUFFIXES), help="stored image format (default jpeg)")
    parser.add_argument("--near-duplicate-distance", type=int, help="perceptual-hash bits (default 2)")
    parser.add_argument(
        "--group-collision", choices=("merge", "prefix", "error"), help="a group name in two sources (default prefix)"
    )
    parser.add_argument(
        "--allow-root",
        action="append",
        type=Path,
        help="a folder that absolute or file:// paths in tables may point into (repeatable; default: the table's own)",
    )
    parser.add_argument("--s3-endpoint", help="S3 API endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--timeout", type=float, help="seconds per remote connection/read (default 10)")
    parser.add_argument("--retries", type=int, help="retries per remote image (default 3)")
    parser.add_argument(
        "--concurrency", type=int, help="remote requests in flight per worker process (ingest.fetch.concurrency)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = ingest(args.sources, args.out, config, progress=not args.no_progress)
    print(
        f"ingest: {result.accepted} accepted, {result.rejected} rejected {dict(result.reasons)}; "
        f"{result.processed} images processed, {result.cached} from cache -> {args.out / 'manifest.parquet'}",
        file=sys.stderr,
    )
    return 0


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """The config from ``--params`` (if given) with the flags that were set applied on top."""
    from easyref.config import load_section

    config = load_section(IngestConfig, args.params, "ingest")
    roots = None if not args.allow_root else (*config.allow_roots, *map(str, args.allow_root))
    try:
        image = _override(config.image, min_side=args.min_side, max_side=args.max_side, max_pixels=args.max_pixels)
        image = _override(image, format=args.format)
        fetch = _override(
            config.fetch,
            s3_endpoint=args.s3_endpoint,
            timeout=args.timeout,
            retries=args.retries,
            concurrency=args.concurrency,
        )
        return _override(
            config,
            workers=args.workers,
            near_duplicate_distance=args.near_duplicate_distance,
            group_collision=args.group_collision,
            allow_roots=roots,
            image=image,
            fetch=fetch,
        )
    except ValueError as exc:
        raise UserError(f"ingest: {exc}") from exc


def ingest(sources: list[str], out: str | Path, config: IngestConfig, *, progress: bool = True) -> IngestResult:
    """Ingest ``sources`` into ``out`` (locked for the whole run); see the module docstring for the outputs."""
    from easyref.locking import FolderLocked, output_lock

    if len(set(sources)) != len(sources):
        raise UserError(f"a source is named twice: {' '.join(sources)}")
    from easyref.data.ingest_out import refuse_out_over_sources

    refuse_out_over_sources(sources, Path(out))
    try:
        with output_lock(out, "ingest"):
            return _ingest_locked(sources, Path(out), config, progress)
    except FolderLocked as exc:
        raise UserError(str(exc)) from None


def _ingest_locked(sources: list[str], out: Path, config: IngestConfig, progress: bool) -> IngestResult:
    from easyref.data.ingest_work import process_all

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, collisions, keys = read_rows(sources, config)
    cache = load_cache(out, config_hash(config))
    todo = sorted({key: row.location for key, row in zip(keys, rows, strict=True) if key and key not in cache}.items())
    fresh = process_all(todo, out, config, progress)
    looked_at = len(set(keys) - {None})
    return finish(out, "ingest", config, rows, collisions, keys, {**cache, **fresh}, len(todo), looked_at - len(todo))


def read_rows(sources: list[str], config: IngestConfig) -> tuple[list[InputRow], dict[str, Any], list[str | None]]:
    """The input rows of ``sources`` in their canonical order (group collisions resolved), the collision record for
    ``stats.json`` and each row's image key (``None`` for a row rejected before its image is looked at)."""
    from easyref.data.groups import resolve_collisions
    from easyref.data.sources import read_source

    rows = [
        row
        for source in sources
        for row in read_source(source, max_caption_chars=config.max_caption_chars, allow_roots=config.allow_roots)
    ]
    if not rows:
        raise UserError(f"no input rows in {' '.join(sources)}: the folders are empty or the tables have no rows")
    rows, collisions = resolve_collisions(rows, sources, config.group_collision)
    rows.sort(key=lambda r: r.sort_key)
    hashed = config_hash(config)
    return rows, collisions, [cache_key(row.location, hashed) if row.location else None for row in rows]


def finish(
    out: Path,
    command: str,
    config: IngestConfig,
    rows: list[InputRow],
    collisions: dict[str, Any],
    keys: list[str | None],
    known: dict[str, Outcome],
    processed: int,
    cached: int,
) -> IngestResult:
    """Write the outputs of ``rows`` to ``out`` (whose ``images/`` hold the stored images) from the outcome of each
    row's image (``known``, by key): duplicates and near duplicates rejected, the tables, stats, cache, commit."""
    from easyref.data import commit
    from easyref.data.groups import reject_duplicates
    from easyref.data.ingest_out import remove_orphans

    outcomes = [
        rejected_outcome(row.problem) if row.problem else known[key] for key, row in zip(keys, rows, strict=True)
    ]
    outcomes = reject_duplicates(rows, outcomes, config.near_duplicate_distance, config.near_duplicate_colour_distance)
    manifest, rejected = _tables(rows, outcomes)
    commit.begin(out, command)
    _write_outputs(out, manifest, rejected, _row_notes(rows, collisions))
    save_cache(out, known, set(keys))
    remove_orphans(out, {o.path for o in outcomes if o.path}, rows)
    commit.finish(out, command, list(OUTPUT_FILES))

    reasons = dict(sorted(Counter(rejected["reason"].to_pylist()).items()))
    if manifest.num_rows == 0:
        raise UserError(
            f"all {len(rows)} input rows were rejected ({', '.join(f'{k}: {v}' for k, v in reasons.items())}); "
            f"see {out / 'rejected.parquet'} for the row-by-row reasons"
        )
    return IngestResult(
        accepted=manifest.num_rows, rejected=rejected.num_rows, processed=processed, cached=cached, reasons=reasons
    )


def _tables(rows: list[InputRow], outcomes: list[Outcome]) -> tuple[pa.Table, pa.Table]:
    """The manifest (sorted by group, image id) and the rejected rows (in input order)."""
    accepted, rejected = [], []
    for row, outcome in zip(rows, outcomes, strict=True):
        base = {"source": row.source, "row": row.row, "uri": row.uri, "group": row.group, "caption": row.caption}
        if outcome.reason is None:
            accepted.append(
                {
                    **base,
                    "image_id": outcome.image_id,
                    "path": outcome.path,
                    "width": outcome.width,
                    "height": outcome.height,
                    "phash": outcome.phash,
                    "metadata": row.metadata,
                }
            )
        else:
            rejected.append({**base, "reason": outcome.reason, "message": outcome.message, "metadata": row.metadata})
    accepted.sort(key=lambda r: (r["group"], r["image_id"]))
    return arrow_table(accepted, MANIFEST_COLUMNS), arrow_table(rejected, REJECTED_COLUMNS)


def _row_notes(rows: list[InputRow], collisions: dict[str, Any]) -> dict[str, Any]:
    """What stats.json records about how rows were changed: cleaned captions/groups and group-name collisions."""
    cleaned: dict[str, Any] = {}
    for field_name in ("caption", "group"):
        hits = [row for row in rows if field_name in row.cleaned]
        examples = [row.uri if row.row is None else f"{row.source} row {row.row}" for row in hits[:20]]
        cleaned[field_name] = {"rows": len(hits), "examples": examples}
    return {"control_characters_stripped": cleaned, "group_collision": collisions}


def _write_outputs(out: Path, manifest: pa.Table, rejected: pa.Table, notes: dict[str, Any]) -> None:
    from easyref.data.parquet import write_json, write_parquet
    from easyref.data.stats import draw_histogram, group_size_bins, ingest_stats

    write_parquet(manifest, out / "manifest.parquet")
    write_parquet(rejected, out / "rejected.parquet")
    stats = {**ingest_stats(manifest.to_pandas(), rejected.to_pandas()), **notes}
    write_json(stats, out / "stats.json")
    sizes = manifest.to_pandas().groupby("group").size().tolist()
    title = f"images per group: {stats['groups']} groups, {stats['accepted']} images"
    draw_histogram(group_size_bins(sizes), out / "group_sizes.png", title)


def config_hash(config: IngestConfig) -> str:
    """Changes when a setting that affects per-image outcomes changes (and so invalidates the cache)."""
    relevant = {
        "image": dataclasses.asdict(config.image),
        "max_bytes": config.fetch.max_bytes,
        "version": HASH_VERSION,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]




def _override(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` with the changes that are not ``None``."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(obj, **changes) if changes else obj
