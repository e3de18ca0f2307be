"""KFP component: ingest image sources into a manifest of groups (``easyref ingest``)."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest(
    sources: list,
    ingested: Output[Dataset],
    stats: Output[Metrics],
    summary: Output[Markdown],
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
):
    """Ingest folder trees and tables of images (paths, s3:// or http(s):// URIs) into ``manifest.parquet``.

    Args:
        sources: Folders (``ROOT/<group>/<image>`` + ``captions.jsonl``) and/or parquet/jsonl/csv tables.
        config: The ``ingest:`` section of params.yaml (workers, image checks, fetch settings).
        ingested: Folder with ``manifest.parquet``, ``rejected.parquet``, ``stats.json`` and ``images/``.
        stats: Accepted / rejected counts, per rejection reason.
        summary: The counts as a Markdown table.
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from components.params import write_section

    if not sources:
        raise ValueError("ingest: no sources given")
    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "ingest", config)
        cmd = [sys.executable, "-m", "easyref.cli", "ingest", *map(str, sources), "--out", ingested.path,
               "--params", params, "--no-progress"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    with open(os.path.join(ingested.path, "stats.json")) as fh:
        numbers = json.load(fh)
    stats.log_metric("accepted", numbers["accepted"])
    stats.log_metric("rejected", numbers["rejected"])
    stats.log_metric("groups", numbers["groups"])
    for reason, count in numbers.get("rejected_by_reason", {}).items():
        stats.log_metric(f"rejected.{reason}", count)
    ingested.metadata.update({"accepted": numbers["accepted"], "rejected": numbers["rejected"],
                              "groups": numbers["groups"]})
    rows = "".join(f"| {reason} | {count} |\n" for reason, count in numbers.get("rejected_by_reason", {}).items())
    with open(summary.path, "w") as fh:
        fh.write(f"## Ingestion\n\n{numbers['accepted']} images accepted in {numbers['groups']} groups, "
                 f"{numbers['rejected']} rows rejected.\n\n| reason | rows |\n|---|---|\n{rows}")
