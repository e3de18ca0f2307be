"""KFP component: ingest image sources into a manifest of groups (``easyref ingest``), or one shard of them
(``easyref ingest-shard``, run in a ``dsl.ParallelFor`` and merged by the ``ingest_merge`` component)."""

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
    shard: int = 0,
    shards: int = 1,
):
    """Ingest folder trees and tables of images (paths, s3:// or http(s):// URIs) into ``manifest.parquet``.

    Args:
        sources: Folders (``ROOT/<group>/<image>`` + ``captions.jsonl``) and/or parquet/jsonl/csv tables.
        config: The ``ingest:`` section of params.yaml (workers, image checks, fetch settings).
        shard: With ``shards`` > 1, the shard this task fetches (0..shards-1).
        shards: 1: the whole ingest. More: this task is one shard (``easyref ingest-shard``), and ``ingested`` holds
            the shard's images and outcomes for ``ingest_merge``.
        ingested: Folder with ``manifest.parquet``, ``rejected.parquet``, ``stats.json`` and ``images/`` (a shard:
            ``outcomes.parquet``, ``shard.json`` and ``images/``).
        stats: Accepted / rejected counts, per rejection reason (a shard: images stored and rejected).
        summary: The counts as a Markdown table.
    """
    import subprocess
    import sys
    import tempfile

    from components.ingest_report import report_ingest, report_shard
    from components.params import write_section

    if not sources:
        raise ValueError("ingest: no sources given")
    command = ["ingest"] if shards == 1 else ["ingest-shard", "--shard", str(shard), "--shards", str(shards)]
    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "ingest", config)
        cmd = [sys.executable, "-m", "easyref.cli", *command, *map(str, sources), "--out", ingested.path,
               "--params", params, "--no-progress"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    (report_ingest if shards == 1 else report_shard)(ingested.path, ingested, stats, summary)
