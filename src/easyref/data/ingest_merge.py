"""Merge the folders of ``easyref ingest-shard`` into the one ingest output of the whole source list.

  easyref ingest-merge SOURCES --shard-dir SHARD_OUT [--shard-dir ...] --out OUT [--params params.yaml]

SOURCES and the ingest settings must be those the shards ran with (checked). OUT gets what ``easyref ingest``
of SOURCES writes (manifest, rejected table, stats, commit, images, cache), with the same duplicate,
near-duplicate and group rules; see :mod:`easyref.data.ingest_shards`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from easyref.data.ingest import add_arguments as add_ingest_arguments
from easyref.data.ingest import config_from_args
from easyref.data.ingest_shards import merge_shards

HELP = "merge the folders of easyref ingest-shard into one ingest output (manifest, rejected, stats, commit)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ingest_arguments(parser)
    parser.add_argument(
        "--shard-dir", action="append", type=Path, required=True, help="a shard folder (repeat for every shard)"
    )


def run(args: argparse.Namespace) -> int:
    result = merge_shards(args.sources, args.shard_dir, args.out, config_from_args(args))
    print(
        f"ingest-merge: {len(args.shard_dir)} shards -> {result.accepted} accepted, {result.rejected} rejected "
        f"{dict(result.reasons)} -> {args.out / 'manifest.parquet'}",
        file=sys.stderr,
    )
    return 0
