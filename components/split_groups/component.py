"""KFP component: split the manifest into train / held-in / held-out groups (``easyref split``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def split_groups(
    ingested: Input[Dataset],
    split: Output[Dataset],
    stats: Output[Metrics],
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
):
    """Split ``manifest.parquet`` by group, as in the paper: held-out groups, held-in targets, the rest trains.

    Args:
        ingested: The ingest component's output folder.
        config: The ``split:`` section of params.yaml (held_out_groups, held_in_groups, seed, ...).
        split: Folder with ``train.parquet``, ``held_in.parquet``, ``held_out.parquet`` and ``split.json``.
        stats: Group, image and test-sample counts per split.
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from components.params import write_section

    with tempfile.TemporaryDirectory() as tmp:
        params = write_section(tmp, "split", config)
        cmd = [sys.executable, "-m", "easyref.cli", "split", "--manifest",
               os.path.join(ingested.path, "manifest.parquet"), "--out", split.path, "--params", params]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    with open(os.path.join(split.path, "split.json")) as fh:
        info = json.load(fh)
    for section in ("groups", "images", "test_samples"):
        for key, value in info.get(section, {}).items():
            stats.log_metric(f"{section}.{key}", value)
    split.metadata.update({"seed": info.get("seed"), "manifest_sha256": info.get("manifest_sha256"),
                           "test_samples": info.get("test_samples")})
