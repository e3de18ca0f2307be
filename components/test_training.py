"""The training components' cluster path without a cluster: staging, the `easyref launch` command, waiting on a
TrainJob (fake Kubernetes API), failure reporting and the copy of the checkpoint back into the artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components import training
from components.training import StageRequest


class FakeApi:
    """CustomObjectsApi stand-in: returns the given TrainJob states in turn (None = 404)."""

    def __init__(self, states: list[dict[str, Any] | None]):
        self.states, self.calls = list(states), 0

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        from kubernetes.client.rest import ApiException

        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        state = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        if state is None:
            raise ApiException(status=404, reason="Not Found")
        return state


def job(condition: str | None, message: str = "") -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "reason": "R", "message": message}] if condition else []
    return {"metadata": {"name": "j"}, "status": {"conditions": conditions}}


def make_inputs(root: Path) -> StageRequest:
    split, ingested, init = root / "split", root / "ingested", root / "init"
    for folder in (split, ingested / "images", ingested / ".cache", init):
        folder.mkdir(parents=True)
    (split / "train.parquet").write_bytes(b"t")
    (split / "held_in.parquet").write_bytes(b"h")
    (split / "split.json").write_text(json.dumps({"manifest": "/somewhere/else/manifest.parquet"}))
    (ingested / "manifest.parquet").write_bytes(b"m")
    (ingested / ".cache" / "ingest.parquet").write_bytes(b"c")
    (init / "easyref_config.json").write_text("{}")
    mount = root / "shared"
    mount.mkdir()
    return StageRequest(stage="single_ref", split_dir=str(split), ingested_dir=str(ingested), base_models="/m/tiny",
                        train_config={"batch_size": 2.0}, out_dir=str(root / "out" / "checkpoint"),
                        init_dir=str(init), max_steps=5, launcher="trainjob", nodes=2, gpus_per_node=8,
                        image="easyref:1", namespace="ns", pvc="easyref-shared", mount_path=str(mount),
                        run_id="Run_0123-ABCD", secret_env=["MLFLOW_TRACKING_PASSWORD=easyref-mlflow:password"],
                        poll_s=0)


def test_job_name_is_a_dns_label() -> None:
    name = training.job_name("multi_ref", "3F2A_91c7-b1f0-4d5e-9a1b-0c3d4e5f6a7b" * 3)
    assert name.startswith("easyref-multi-ref-") and len(name) <= 63
    assert name == name.lower() and not name.endswith("-") and "_" not in name


def test_trainjob_state_reads_conditions() -> None:
    assert training.trainjob_state(job(None)) == ("Running", "")
    assert training.trainjob_state(job("Complete"))[0] == "Complete"
    assert training.trainjob_state(job("Failed", "node-0 OOMKilled")) == ("Failed", "R: node-0 OOMKilled")


def test_wait_returns_on_complete_and_raises_on_failure() -> None:
    api = FakeApi([job(None), job(None), job("Complete")])
    training.wait_for_trainjob(api, "ns", "j", timeout_s=60, poll_s=0)
    assert api.calls == 3
    with pytest.raises(RuntimeError, match="failed: R: exit code 1.*kubectl logs -n ns"):
        training.wait_for_trainjob(FakeApi([job("Failed", "exit code 1")]), "ns", "j", timeout_s=60, poll_s=0)
    with pytest.raises(RuntimeError, match="did not finish"):
        training.wait_for_trainjob(FakeApi([job(None)]), "ns", "j", timeout_s=0, poll_s=0)
    with pytest.raises(RuntimeError, match="disappeared"):
        training.wait_for_trainjob(FakeApi([None]), "ns", "j", timeout_s=60, poll_s=0)


def test_stage_inputs_copies_once_and_points_split_json_at_the_staged_manifest(tmp_path: Path) -> None:
    req = make_inputs(tmp_path)
    split, stage_dir, init = training.stage_inputs(req)
    root = Path(req.mount_path) / "pipeline-runs" / req.run_id
    assert split == root / "split" and stage_dir == root / "single_ref" and init == stage_dir / "init"
    assert json.loads((split / "split.json").read_text())["manifest"] == str(root / "ingested" / "manifest.parquet")
    assert not (root / "ingested" / ".cache").exists()
    (root / "ingested" / "marker").write_text("kept")  # a second stage re-uses the staged copy
    training.stage_inputs(req)
    assert (root / "ingested" / "marker").is_file()


def test_stage_inputs_needs_the_shared_volume(tmp_path: Path) -> None:
    req = make_inputs(tmp_path)
    req.mount_path = str(tmp_path / "not-mounted")
    with pytest.raises(RuntimeError, match="not mounted"):
        training.stage_inputs(req)


def test_run_trainjob_launches_waits_and_copies_the_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    req = make_inputs(tmp_path)
    api = FakeApi([None, job(None), job("Complete")])
    launched: list[list[str]] = []

    def fake_run(cmd, check=False):
        launched.append(cmd)
        run_dir = Path(cmd[cmd.index("--out") + 1])  # what the TrainJob would write on the shared volume
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "easyref_config.json").write_text(json.dumps(
            {"parts": ["lora"], "extra": {"step": 5, "mlflow_run_id": "abc"}}))

    monkeypatch.setattr(training, "_kube_api", lambda: api)
    monkeypatch.setattr(training.subprocess, "run", fake_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    info = training.run_stage(req)

    assert info == {"stage": "single_ref", "step": 5, "mlflow_run_id": "abc", "parts": ["lora"],
                    "launcher": "trainjob"}
    assert json.loads((Path(req.out_dir) / "easyref_config.json").read_text())["extra"]["step"] == 5
    cmd = launched[0]
    text = " ".join(cmd)
    assert cmd[cmd.index("launch") + 1] == "--submit"
    for flag in ("--nodes 2", "--gpus-per-node 8", "--pvc easyref-shared", "--namespace ns", "--image easyref:1",
                 "--env MLFLOW_TRACKING_URI=http://mlflow:5000", f"--env EASYREF_PIPELINE_RUN={req.run_id}",
                 "--secret-env MLFLOW_TRACKING_PASSWORD=easyref-mlflow:password", "--stage single_ref"):
        assert flag in text
    extra = cmd[cmd.index("--") + 1:]
    staged = Path(req.mount_path) / "pipeline-runs" / req.run_id
    assert extra[extra.index("--image-root") + 1] == str(staged / "ingested")
    assert extra[extra.index("--data") + 1] == str(staged / "split" / "train.parquet")
    assert extra[extra.index("--max-steps") + 1] == "5"
    assert cmd[cmd.index("--init") + 1] == str(staged / "single_ref" / "init")
    params = (staged / "single_ref" / "params.yaml").read_text()
    assert "batch_size: 2\n" in params  # KFP's float 2.0 written back as an int


def test_run_trainjob_reattaches_to_an_existing_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    req = make_inputs(tmp_path)
    final = Path(req.mount_path) / "pipeline-runs" / req.run_id / "single_ref" / "run" / "final"
    final.mkdir(parents=True)
    (final / "easyref_config.json").write_text("{}")
    monkeypatch.setattr(training, "_kube_api", lambda: FakeApi([job("Complete")]))
    monkeypatch.setattr(training.subprocess, "run", lambda *a, **k: pytest.fail("must not create a second job"))
    training.run_stage(req)
    assert (Path(req.out_dir) / "easyref_config.json").is_file()


def test_run_stage_rejects_an_unknown_launcher(tmp_path: Path) -> None:
    req = make_inputs(tmp_path)
    req.launcher = "slurm"
    with pytest.raises(ValueError, match="launcher"):
        training.run_stage(req)


def test_trainjob_nodes_request_and_limit_cpu_and_memory(tmp_path: Path) -> None:
    """params.yaml cluster.node_resources reaches the TrainJob: the launch command, parsed by `easyref launch`'s own
    parser, renders resourcesPerNode with CPU and memory requests = limits beside the GPUs."""
    import argparse

    import yaml

    from easyref.train.launch import add_arguments, config_from_args, render_trainjob

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    node = params["cluster"]["node_resources"]
    req = make_inputs(tmp_path)
    req.node_cpu, req.node_memory = str(node["cpu"]), str(node["memory"])
    split, stage_dir = tmp_path / "split", tmp_path / "stage"
    cmd = training.launch_command(req, "easyref-single-ref-x", stage_dir / "params.yaml", split, stage_dir, None)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(cmd[cmd.index("launch") + 1:])
    resources = render_trainjob(config_from_args(args))["spec"]["trainer"]["resourcesPerNode"]
    expected = {"cpu": str(node["cpu"]), "memory": str(node["memory"]), "nvidia.com/gpu": 8}
    assert resources == {"limits": expected, "requests": expected}
    req.node_cpu = req.node_memory = ""  # unset: GPUs only, as before
    cmd = training.launch_command(req, "easyref-single-ref-x", stage_dir / "params.yaml", split, stage_dir, None)
    assert "--cpu" not in cmd and "--memory" not in cmd
