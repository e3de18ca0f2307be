"""The finetune component through kfp.local: single_ref from a pretraining checkpoint, 2 CPU processes, one step."""

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.finetune.component import finetune
from components.testing import TINY_TRAIN


def _pipeline(stage: str):
    @dsl.pipeline(name="finetune-test")
    def finetune_test(init_uri: str, split_uri: str, ingested_uri: str, base_models: str) -> dsl.Model:
        init = dsl.importer(artifact_uri=init_uri, artifact_class=dsl.Model)
        split = dsl.importer(artifact_uri=split_uri, artifact_class=dsl.Dataset)
        ingested = dsl.importer(artifact_uri=ingested_uri, artifact_class=dsl.Dataset)
        task = finetune(stage=stage, init=init.output, split=split.output, ingested=ingested.output,
                        base_models=base_models, config={**TINY_TRAIN, "lora_rank": 4}, max_steps=1, nproc=2)
        return task.outputs["checkpoint"]

    return finetune_test


def test_finetune_single_ref_from_pretrained(kfp_local: Path, workspace: dict[str, Path], pretrained: Path) -> None:
    run = _pipeline("single_ref")(init_uri=str(pretrained), split_uri=str(workspace["split"]),
                                  ingested_uri=str(workspace["ingested"]), base_models=str(workspace["models"]))

    out = Path(run.output.path)
    config = json.loads((out / "easyref_config.json").read_text())
    assert config["extra"]["stage"] == "single_ref" and config["extra"]["step"] == 1
    assert "lora" in config["parts"]


def test_finetune_rejects_unknown_stage(kfp_local: Path, workspace: dict[str, Path], pretrained: Path) -> None:
    with pytest.raises(RuntimeError, match="FAILURE"):
        _pipeline("pretrain")(init_uri=str(pretrained), split_uri=str(workspace["split"]),
                              ingested_uri=str(workspace["ingested"]), base_models=str(workspace["models"]))
