"""The register component through kfp.local: a checkpoint and its metrics become model@challenger and @champion."""

import json
from pathlib import Path

from kfp import dsl

from components.register.component import register


def test_register_promotes_first_version(
    kfp_local: Path, pretrained: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    locks = tmp_path / "shared" / "locks"  # what the pipeline passes: a folder of the shared volume
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(
        json.dumps({"easyref.clip_i": 0.5, "easyref.clip_t": 0.2, "easyref.dino_i": 0.4})
    )
    from easyref.data.parquet import sha256_file
    from easyref.registry import checkpoint_sha256

    seal = {
        "checkpoint_sha256": checkpoint_sha256(pretrained),
        "metrics_sha256": sha256_file(evaluation / "metrics.json"),
    }
    (evaluation / "evaluation.json").write_text(json.dumps(seal))

    @dsl.pipeline(name="register-test")
    def register_test(checkpoint_uri: str, evaluation_uri: str, base_models: str) -> str:
        checkpoint = dsl.importer(artifact_uri=checkpoint_uri, artifact_class=dsl.Model)
        results = dsl.importer(artifact_uri=evaluation_uri, artifact_class=dsl.Dataset)
        task = register(
            checkpoint=checkpoint.output,
            evaluation=results.output,
            base_models=base_models,
            model_name="easyref-test",
            promote=True,
            lock_dir=str(locks),
            pipeline_run="kfp-run-1",
        )
        return task.outputs["champion"]

    run = register_test(
        checkpoint_uri=str(pretrained), evaluation_uri=str(evaluation), base_models=str(workspace["models"])
    )

    assert run.output == "1"
    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_model_version_by_alias("easyref-test", "challenger")
    assert str(version.version) == "1"
    assert [p.name for p in locks.iterdir()][0].startswith("easyref-registry-")  # the lock was taken there
    # the registration's run is nested under the pipeline execution's run
    run = client.get_run(version.run_id)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert run.info.run_name == "register-kfp-run-1" and parent.data.tags["easyref.pipeline_run"] == "kfp-run-1"
