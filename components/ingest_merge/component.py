"""KFP component: merge the shards of a fanned-out ingest into one ingested dataset (``easyref ingest-merge``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest_merge(
    sources: list,
    shards: Input[list[Dataset]],
    ingested: Output[Dataset],
    stats: Output[Metrics],
    summary: Output[Markdown],
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
):
    """Write the one manifest / rejected table / stats / commit of ``sources`` from the shards' outputs.

    Args:
        sources: The sources the shards ingested (checked against each shard).
        shards: The ``ingested`` outputs of the ``ingest`` tasks with ``shards`` > 1 (``dsl.Collected``), all of
            them.
        config: The ``ingest:`` section of params.yaml the shards ran with (checked).
        ingested: Folder with ``manifest.parquet``, ``rejected.parquet``, ``stats.json`` and ``images/``: what a
            single ``ingest`` task writes.
        stats: Accepted / rejected counts, per rejection reason.
        summary: The counts as a Markdown table.
    """
    import subprocess
    import sys
    import tempfile

    from components.ingest_report import report_ingest
    from components.params import write_section

    if not sources or not shards:
        raise ValueError("ingest_merge: no sources or no shards given")
    folders = [arg for shard in shards for arg in ("--shard-dir", shard.path)]
    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "ingest", config)
        cmd = [sys.executable, "-m", "easyref.cli", "ingest-merge", *map(str, sources), *folders,
               "--out", ingested.path, "--params", params, "--no-progress"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    report_ingest(ingested.path, ingested, stats, summary)
