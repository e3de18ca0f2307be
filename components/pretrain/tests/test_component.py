"""The pretrain component through kfp.local: torchrun with 2 CPU processes, one optimizer step."""

import json
from pathlib import Path

from kfp import dsl

from components.pretrain.component import pretrain
from components.testing import TINY_TRAIN


def test_pretrain_two_processes_writes_checkpoint(kfp_local: Path, workspace: dict[str, Path]) -> None:
    @dsl.pipeline(name="pretrain-test")
    def pretrain_test(split_uri: str, ingested_uri: str, base_models: str) -> dsl.Model:
        split = dsl.importer(artifact_uri=split_uri, artifact_class=dsl.Dataset)
        ingested = dsl.importer(artifact_uri=ingested_uri, artifact_class=dsl.Dataset)
        task = pretrain(split=split.output, ingested=ingested.output, base_models=base_models, config=TINY_TRAIN,
                        max_steps=1, launcher="torchrun", nproc=2)
        return task.outputs["checkpoint"]

    run = pretrain_test(split_uri=str(workspace["split"]), ingested_uri=str(workspace["ingested"]),
                        base_models=str(workspace["models"]))

    out = Path(run.output.path)
    config = json.loads((out / "easyref_config.json").read_text())
    assert (out / "easyref.safetensors").is_file()
    assert config["extra"]["stage"] == "pretrain" and config["extra"]["step"] == 1
