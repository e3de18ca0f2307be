"""Ingest across pods: shard K of N fetches and normalises its part of the images; a merge writes the whole set.

  easyref ingest-shard SOURCES --out SHARD_OUT --shard K --shards N [--params params.yaml]   # one per pod
  easyref ingest-merge SOURCES --shard-dir SHARD_OUT ... --out OUT [--params params.yaml]   # once, after all

Every shard reads the whole source list (cheap next to fetching) in the same canonical order as ``easyref ingest``
and takes the images whose key hashes to its index: each image is fetched by exactly one shard, whatever the order
of the rows, and rows naming the same image land in the same shard. A shard folder holds its stored images,
``outcomes.parquet`` (the outcome of each of its images, fetch failures included), ``shard.json`` (index, count,
sources, settings hash) and ``commit.json``; it keeps an ingest cache, so a retried shard task only fetches what it
had not.

The merge reads the sources again, checks that the shard folders are complete, are all N shards of these sources
under these settings (each once), brings their images into OUT, and then writes the manifest, rejected table,
stats and commit exactly as ``easyref ingest`` does, with the same duplicate, near-duplicate and group rules:
OUT is the folder a single ``easyref ingest`` of the same sources writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from easyref.data.ingest import (
    IngestResult,
    config_from_args,
    config_hash,
    finish,
    read_rows,
)
from easyref.data.ingest import add_arguments as add_ingest_arguments
from easyref.data.ingest_config import IngestConfig
from easyref.data.ingest_out import refuse_out_over_sources, remove_orphans
from easyref.data.outcome import Outcome, load_cache, read_outcomes, save_cache, write_outcomes
from easyref.errors import UserError

HELP = "ingest one shard of the images of SOURCES (one pod of a fanned-out ingest; then easyref ingest-merge)"
OUTCOMES_FILE = "outcomes.parquet"
SHARD_FILE = "shard.json"


def shard_of(key: str, shards: int) -> int:
    """The shard (0..shards-1) that fetches the image of ``key`` (its location; the settings hash left out)."""
    location = key.partition("|")[2]
    return int.from_bytes(hashlib.sha256(location.encode()).digest()[:8], "big") % shards


def ingest_shard(
    sources: list[str], out: str | Path, config: IngestConfig, shard: int, shards: int, *, progress: bool = True
) -> dict[str, Any]:
    """Fetch and store shard ``shard`` of ``shards`` of the images of ``sources`` in ``out``; returns shard.json."""
    from easyref.locking import FolderLocked, output_lock

    if not (isinstance(shards, int) and shards >= 1 and isinstance(shard, int) and 0 <= shard < shards):
        raise UserError(f"ingest-shard: --shard must be in 0..{shards - 1} for --shards {shards}, got {shard}")
    _check_unique(sources)
    refuse_out_over_sources(sources, Path(out))
    try:
        with output_lock(out, "ingest-shard"):
            return _shard_locked(sources, Path(out), config, shard, shards, progress)
    except FolderLocked as exc:
        raise UserError(str(exc)) from None


def _shard_locked(
    sources: list[str], out: Path, config: IngestConfig, shard: int, shards: int, progress: bool
) -> dict[str, Any]:
    from easyref.data import commit
    from easyref.data.ingest_work import process_all
    from easyref.data.parquet import write_json

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, _, keys = read_rows(sources, config)
    hashed = config_hash(config)
    mine = sorted(
        {k: row.location for k, row in zip(keys, rows, strict=True) if k and shard_of(k, shards) == shard}.items()
    )
    cache = load_cache(out, hashed)
    todo = [(key, location) for key, location in mine if key not in cache]
    fresh = process_all(todo, out, config, progress)
    outcomes = {key: fresh.get(key) or cache[key] for key, _ in mine}
    reasons = Counter(o.reason for o in outcomes.values() if o.reason)
    info = {
        "shard": shard,
        "shards": shards,
        "sources": sources,
        "config_hash": hashed,
        "images": len(outcomes),
        "stored": len(outcomes) - sum(reasons.values()),
        "processed": len(todo),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }
    what = f"ingest-shard --shard {shard} --shards {shards}"
    commit.begin(out, what)
    write_outcomes(out / OUTCOMES_FILE, outcomes)
    write_json(info, out / SHARD_FILE)
    save_cache(out, outcomes, set(outcomes))
    remove_orphans(out, {o.path for o in outcomes.values() if o.path}, rows)
    commit.finish(out, what, [OUTCOMES_FILE, SHARD_FILE])
    return info


def merge_shards(
    sources: list[str], shard_dirs: list[str | Path], out: str | Path, config: IngestConfig
) -> IngestResult:
    """Write the ingest outputs of ``sources`` to ``out`` from the shard folders ``shard_dirs``."""
    from easyref.locking import FolderLocked, output_lock

    _check_unique(sources)
    refuse_out_over_sources(sources, Path(out))
    try:
        with output_lock(out, "ingest-merge"):
            return _merge_locked(sources, [Path(d) for d in shard_dirs], Path(out), config)
    except FolderLocked as exc:
        raise UserError(str(exc)) from None


def _merge_locked(sources: list[str], shard_dirs: list[Path], out: Path, config: IngestConfig) -> IngestResult:
    rows, collisions, keys = read_rows(sources, config)
    known = _read_shards(shard_dirs, sources, config_hash(config))
    missing = [key for key in keys if key and key not in known]
    if missing:
        raise UserError(
            f"the shard folders hold no outcome for {len(missing)} image(s) ({missing[0]}); re-run the shards"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    looked_at: dict[str, Outcome] = {}
    for key in keys:
        if key and key not in looked_at:
            outcome, folder = known[key]
            if outcome.path:
                _bring(folder / outcome.path, out / outcome.path)
            looked_at[key] = outcome
    return finish(out, "ingest-merge", config, rows, collisions, keys, looked_at, 0, len(looked_at))


def _read_shards(shard_dirs: list[Path], sources: list[str], hashed: str) -> dict[str, tuple[Outcome, Path]]:
    """The outcomes of all shards, after checking that the folders are the N complete shards of this ingest."""
    from easyref.data import commit

    if not shard_dirs:
        raise UserError("ingest-merge: no shard folders given (--shard-dir)")
    found: dict[str, tuple[Outcome, Path]] = {}
    indices: dict[int, Path] = {}
    counts = set()
    for folder in shard_dirs:
        marker = folder / SHARD_FILE
        if not marker.is_file():
            raise UserError(f"{folder} is not an ingest shard (no {SHARD_FILE}); run easyref ingest-shard into it")
        commit.check(marker)
        commit.check(folder / OUTCOMES_FILE)
        info = json.loads(marker.read_text())
        if info["sources"] != sources or info["config_hash"] != hashed:
            raise UserError(
                f"{folder} is a shard of other sources or other ingest settings ({info['sources']}); give "
                f"ingest-merge the sources and --params of the shards, or re-run the shards"
            )
        if info["shard"] in indices:
            raise UserError(f"{folder} and {indices[info['shard']]} are both shard {info['shard']}")
        indices[info["shard"]] = folder
        counts.add(info["shards"])
        for key, outcome in read_outcomes(folder / OUTCOMES_FILE).items():
            found[key] = (outcome, folder)
    if len(counts) != 1 or set(indices) != set(range(next(iter(counts)))):
        total = max(counts)
        absent = sorted(set(range(total)) - set(indices))
        raise UserError(
            f"ingest-merge needs all {total} shards, each once; shard(s) {absent or '?'} missing "
            f"(shard counts seen: {sorted(counts)})"
        )
    return found


def _bring(source: Path, target: Path) -> None:
    """Put the shard's stored image at ``target`` (a hard link where the filesystem allows, else a copy)."""
    if target.exists():
        return
    if not source.is_file():
        raise UserError(f"{source} is listed in its shard's {OUTCOMES_FILE} but missing; re-run that shard")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _check_unique(sources: list[str]) -> None:
    if len(set(sources)) != len(sources):
        raise UserError(f"a source is named twice: {' '.join(sources)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ingest_arguments(parser)
    parser.add_argument("--shard", type=int, required=True, help="this shard's index, 0..N-1")
    parser.add_argument("--shards", type=int, help="the number of shards N (default: ingest.shards)")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    shards = args.shards if args.shards is not None else config.shards
    info = ingest_shard(args.sources, args.out, config, args.shard, shards, progress=not args.no_progress)
    print(
        f"ingest-shard {info['shard']}/{info['shards']}: {info['stored']} of {info['images']} images stored "
        f"{info['rejected_by_reason']}, {info['processed']} processed -> {args.out}",
        file=sys.stderr,
    )
    return 0
