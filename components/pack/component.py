"""KFP component: pack the training split into sequential shards (``easyref pack``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pack(
    split: Input[Dataset],
    ingested: Input[Dataset],
    shards: Output[Dataset],
    stats: Output[Metrics],
    destination: str = "",
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
):
    """Pack ``train.parquet``'s groups (images from the ingest folder) into WebDataset tar shards.

    Args:
        split: The split_groups component's output folder (``train.parquet``).
        ingested: The ingest component's output folder (the images the table's paths name).
        destination: ``s3://bucket/prefix`` to write the shards to; empty: into the ``shards`` artifact.
        config: The ``pack:`` section of params.yaml (``shard_mb``).
        shards: The packed set (shards, ``index.parquet``, ``shards.json``), or with ``destination`` a copy of its
            ``shards.json``; its metadata ``location`` is what ``easyref train --data`` takes.
        stats: Groups, images, shards and bytes.
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from components.params import write_section

    location = destination or shards.path
    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "pack", config)
        cmd = [sys.executable, "-m", "easyref.cli", "pack", "--split", os.path.join(split.path, "train.parquet"),
               "--image-root", ingested.path, "--out", location, "--params", params]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    if destination:
        from easyref.data.shard_store import open_store

        marker_bytes = open_store(destination).read("shards.json")
        os.makedirs(shards.path, exist_ok=True)
        with open(os.path.join(shards.path, "shards.json"), "wb") as fh:
            fh.write(marker_bytes)
    with open(os.path.join(shards.path, "shards.json")) as fh:
        marker = json.load(fh)
    total = sum(s["bytes"] for s in marker["shards"])
    for key, value in (("groups", marker["groups"]), ("images", marker["images"]),
                       ("shards", len(marker["shards"])), ("bytes", total)):
        stats.log_metric(key, value)
    shards.metadata.update({"location": location, "groups": marker["groups"], "images": marker["images"],
                            "shards": len(marker["shards"]), "index_sha256": marker["index"]["sha256"]})
