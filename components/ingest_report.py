"""The metrics and Markdown summary of the ingest components (``ingest``, ``ingest_merge``), from the files
``easyref ingest`` / ``ingest-merge`` (``stats.json``) and ``easyref ingest-shard`` (``shard.json``) write."""

from __future__ import annotations

import json
import os
from typing import Any


def report_ingest(folder: str, ingested: Any, stats: Any, summary: Any) -> None:
    """Counts of a whole ingest (``stats.json``): metrics, the dataset's metadata and a Markdown table."""
    with open(os.path.join(folder, "stats.json")) as fh:
        numbers = json.load(fh)
    stats.log_metric("accepted", numbers["accepted"])
    stats.log_metric("rejected", numbers["rejected"])
    stats.log_metric("groups", numbers["groups"])
    for reason, count in numbers.get("rejected_by_reason", {}).items():
        stats.log_metric(f"rejected.{reason}", count)
    ingested.metadata.update(
        {"accepted": numbers["accepted"], "rejected": numbers["rejected"], "groups": numbers["groups"]}
    )
    rows = "".join(f"| {reason} | {count} |\n" for reason, count in numbers.get("rejected_by_reason", {}).items())
    with open(summary.path, "w") as fh:
        fh.write(
            f"## Ingestion\n\n{numbers['accepted']} images accepted in {numbers['groups']} groups, "
            f"{numbers['rejected']} rows rejected.\n\n| reason | rows |\n|---|---|\n{rows}"
        )


def report_shard(folder: str, ingested: Any, stats: Any, summary: Any) -> None:
    """Counts of one shard (``shard.json``): the images it fetched, stored and rejected."""
    with open(os.path.join(folder, "shard.json")) as fh:
        info = json.load(fh)
    for name in ("shard", "shards", "images", "stored", "processed"):
        stats.log_metric(name, info[name])
    for reason, count in info.get("rejected_by_reason", {}).items():
        stats.log_metric(f"rejected.{reason}", count)
    ingested.metadata.update({name: info[name] for name in ("shard", "shards", "images", "stored")})
    rows = "".join(f"| {reason} | {count} |\n" for reason, count in info.get("rejected_by_reason", {}).items())
    with open(summary.path, "w") as fh:
        fh.write(
            f"## Ingestion shard {info['shard']} of {info['shards']}\n\n{info['stored']} of {info['images']} images "
            f"stored ({info['processed']} fetched, the rest from the shard's cache).\n\n"
            f"| reason | images |\n|---|---|\n{rows}"
        )
