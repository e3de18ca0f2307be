"""pipelines/full.py: the compiled package chains every step, with GPU requests, secrets and volumes on the right
tasks; `local` runs the whole pipeline in kfp.local (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.testing import fast_params, run_watched, tool_env  # noqa: E402

TRAINING_EXECUTORS = ("exec-pretrain", "exec-finetune", "exec-finetune-2")


def load_full():
    spec = importlib.util.spec_from_file_location("easyref_full_pipeline", ROOT / "pipelines" / "full.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) of `python pipelines/full.py compile FLAGS`."""
    out = tmp_path_factory.mktemp("compile") / "full.yaml"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "full.py"),
            "compile",
            "--out",
            str(out),
            "--image",
            "registry.example/easyref:1.2.3",
            *flags,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The default package: params.yaml's launcher, trainjob."""
    return compiled(tmp_path_factory)


@pytest.fixture(scope="module")
def torchrun_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return compiled(tmp_path_factory, "--launcher", "torchrun")


def test_package_chains_every_step(package: tuple[dict, dict]) -> None:
    spec, _ = package
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "split-groups", "pretrain", "finetune", "finetune-2", "evaluate", "register"}
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps["split-groups"] == {"ingest"}
    assert "split-groups" in deps["pretrain"]
    assert "pretrain" in deps["finetune"] and "finetune" in deps["finetune-2"]
    assert "finetune-2" in deps["evaluate"] and {"evaluate", "finetune-2"} <= deps["register"]
    stages = {
        name: tasks[name]["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"]
        for name in ("finetune", "finetune-2")
    }
    assert stages == {"finetune": "single_ref", "finetune-2": "multi_ref"}


@pytest.fixture(scope="module")
def sharded_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return compiled(tmp_path_factory, "--shards", "3")


def test_sharded_ingest_is_a_parallel_for_then_a_merge_that_split_reads(sharded_package: tuple[dict, dict]) -> None:
    spec, executors = sharded_package
    tasks = spec["root"]["dag"]["tasks"]
    assert {"for-loop-2", "ingest-merge"} <= set(tasks) and "ingest" not in tasks
    loop = tasks["for-loop-2"]
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2]"
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    inputs = body["ingest"]["inputs"]["parameters"]
    assert inputs["shards"]["runtimeValue"]["constant"] == 3
    assert inputs["shard"]["componentInputParameter"].startswith("pipelinechannel--loop-item")
    merge = tasks["ingest-merge"]
    assert merge["dependentTasks"] == ["for-loop-2"]
    assert merge["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]["producerTask"] == "for-loop-2"
    assert tasks["split-groups"]["inputs"]["artifacts"]["ingested"]["taskOutputArtifact"]["producerTask"] == (
        "ingest-merge"
    )
    command = " ".join(spec["deploymentSpec"]["executors"]["exec-ingest-merge"]["container"]["command"])
    assert "ingest-merge" in command and "--shard-dir" in command
    for name in ("exec-ingest", "exec-ingest-merge"):  # both on the shared volume, with the pod labels
        assert executors[name]["pvcMount"] and executors[name]["podMetadata"]["labels"]


def test_a_pack_destination_adds_a_pack_task_and_the_stages_train_from_its_shards(tmp_path_factory) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cluster"]["pack_destination"] = "s3://bucket/shards/v1"
    params_file = tmp_path_factory.mktemp("pack") / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    spec, executors = compiled(tmp_path_factory, "--params", str(params_file))
    tasks = spec["root"]["dag"]["tasks"]
    packed = tasks["pack"]
    assert packed["inputs"]["parameters"]["destination"]["runtimeValue"]["constant"] == "s3://bucket/shards/v1"
    assert packed["inputs"]["artifacts"]["split"]["taskOutputArtifact"]["producerTask"] == "split-groups"
    for name in ("pretrain", "finetune", "finetune-2"):
        assert "pack" in tasks[name]["dependentTasks"], name
        assert tasks[name]["inputs"]["parameters"]["data"]["runtimeValue"]["constant"] == "s3://bucket/shards/v1"
    assert executors["exec-pack"]["podMetadata"]["labels"]  # on the cluster like the other tasks
    # without a destination the graph has no pack task and the stages read the split's files
    plain, _ = compiled(tmp_path_factory)
    assert "pack" not in plain["root"]["dag"]["tasks"]
    bad = dict(params, cluster={**params["cluster"], "pack_destination": "/mnt/shards"})
    params_file.write_text(yaml.safe_dump(bad))
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "full.py"), "compile", "--out",
                           str(params_file.with_name("x.yaml")), "--params", str(params_file)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "pack_destination" in done.stderr


def test_parameters_default_to_params_yaml(package: tuple[dict, dict]) -> None:
    spec, _ = package
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["split_config"]["defaultValue"] == params["split"]
    assert inputs["pretrain_steps"]["defaultValue"] == params["train"]["pretrain"]["max_steps"]
    assert inputs["sources"]["defaultValue"] == params["data"]["sources"]
    assert inputs["nodes"]["defaultValue"] == params["cluster"]["nodes"]
    assert inputs["gpus_per_node"]["defaultValue"] == params["cluster"]["gpus_per_node"]
    assert inputs["model_name"]["defaultValue"] == params["register"]["model_name"]
    for name in ("mlflow_tracking_uri", "image", "shared_pvc", "base_models", "train_config"):
        assert name in inputs


def assert_gpu_pod(executors: dict, k8s: dict, name: str) -> None:
    resources = executors[name]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "pipelinechannel--" in resources["accelerator"]["resourceCount"]  # a pipeline parameter
    platform = k8s[name]
    assert platform["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi", "volumeName": "dshm"}
    ]
    assert platform["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert platform["tolerations"][0]["key"] == "nvidia.com/gpu"


def assert_cpu_pod(executors: dict, k8s: dict, name: str) -> None:
    assert "accelerator" not in (executors[name]["container"].get("resources") or {}), name
    assert not {"emptyDirMounts", "nodeSelector", "tolerations"} & set(k8s[name]), name


def test_trainjob_submitters_are_small_cpu_pods_and_evaluate_gets_gpus(package: tuple[dict, dict]) -> None:
    """With launcher=trainjob the training tasks only submit and wait: no GPU node, no 64Gi /dev/shm."""
    spec, k8s = package
    executors = spec["deploymentSpec"]["executors"]
    for name in (*TRAINING_EXECUTORS, "exec-ingest", "exec-split-groups", "exec-register"):
        assert_cpu_pod(executors, k8s, name)
    assert_gpu_pod(executors, k8s, "exec-evaluate")
    cluster = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    for name in TRAINING_EXECUTORS:
        assert (
            executors[name]["container"]["resources"]["resourceMemoryLimit"]
            == cluster["task_resources"]["submit"]["memory"]
        )


def test_torchrun_training_tasks_request_gpus_and_get_shm_nodes_and_tolerations(
    torchrun_package: tuple[dict, dict],
) -> None:
    spec, k8s = torchrun_package
    executors = spec["deploymentSpec"]["executors"]
    for name in (*TRAINING_EXECUTORS, "exec-evaluate"):
        assert_gpu_pod(executors, k8s, name)
    for name in ("exec-ingest", "exec-split-groups", "exec-register"):
        assert_cpu_pod(executors, k8s, name)
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["pretrain"]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"] == "torchrun"


def test_every_task_has_limits_labels_a_non_root_user_and_transient_steps_retry(package: tuple[dict, dict]) -> None:
    spec, k8s = package
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources.get(key), (name, key)
        assert k8s[name]["podMetadata"]["labels"] == {
            "app.kubernetes.io/part-of": "easyref",
            "app.kubernetes.io/component": "pipeline-task",
            "sidecar.istio.io/inject": "false",  # out of the Istio mesh in a Kubeflow profile namespace
        }
        context = k8s[name]["securityContext"]
        assert context["runAsNonRoot"] is True and int(context["runAsUser"]) != 0, name
    tasks = spec["root"]["dag"]["tasks"]
    retried = {name for name, task in tasks.items() if task.get("retryPolicy", {}).get("maxRetryCount")}
    assert retried == {"ingest", "evaluate"}


def test_every_task_gets_secrets_as_env_and_the_shared_volume(package: tuple[dict, dict]) -> None:
    spec, k8s = package
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])
    for platform in k8s.values():
        secrets: dict[str, set[str]] = {}
        for entry in platform["secretAsEnv"]:
            secrets.setdefault(entry["secretName"], set()).update(k["envVar"] for k in entry["keyToEnv"])
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= secrets[params["mlflow_secret"]]
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secrets[params["s3_secret"]]
        assert platform["pvcMount"][0]["mountPath"] == params["mount_path"]
        assert platform["pvcMount"][0]["pvcNameParameter"]["componentInputParameter"] == "shared_pvc"


def test_components_run_in_the_project_image_without_installing_packages(package: tuple[dict, dict]) -> None:
    spec, _ = package
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == "registry.example/easyref:1.2.3", name
        command = " ".join(container["command"])
        assert "pip install" not in command and "kfp.dsl.executor_main" in command


def test_trainjob_launcher_settings_reach_the_training_tasks(package: tuple[dict, dict]) -> None:
    spec, _ = package
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("pretrain", "finetune", "finetune-2"):
        inputs = tasks[name]["inputs"]["parameters"]
        for key, source in {
            "nodes": "nodes",
            "gpus_per_node": "gpus_per_node",
            "pvc": "shared_pvc",
            "image": "image",
            "namespace": "namespace",
        }.items():
            assert inputs[key]["componentInputParameter"] == source, (name, key)
        assert inputs["launcher"]["runtimeValue"]["constant"] == "trainjob"
        cluster = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
        assert inputs["node_resources"]["runtimeValue"]["constant"] == cluster["node_resources"]
        assert {"cpu", "memory"} <= set(cluster["node_resources"])
        assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        secret_env = inputs["secret_env"]["runtimeValue"]["constant"]
        assert any(s.startswith("MLFLOW_TRACKING_PASSWORD=") for s in secret_env)


def test_register_takes_its_lock_on_the_shared_volume(package: tuple[dict, dict]) -> None:
    """register.lock_dir reaches the register task as a folder under the mount path of the shared volume."""
    spec, k8s = package
    cluster = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    inputs = spec["root"]["dag"]["tasks"]["register"]["inputs"]["parameters"]
    assert inputs["lock_dir"]["componentInputParameter"] == "register_lock_dir"
    lock_dir = spec["root"]["inputDefinitions"]["parameters"]["register_lock_dir"]["defaultValue"]
    (mount,) = k8s["exec-register"]["pvcMount"]
    assert mount["mountPath"] == cluster["mount_path"] and mount["pvcNameParameter"]["componentInputParameter"] == (
        "shared_pvc"
    )
    assert Path(lock_dir).is_relative_to(mount["mountPath"]) and Path(lock_dir) != Path(mount["mountPath"])


def test_every_stage_names_the_pipeline_execution_its_mlflow_run_nests_under(package: tuple[dict, dict]) -> None:
    spec, _ = package
    tasks = spec["root"]["dag"]["tasks"]
    for name, key in {
        "pretrain": "run_id",
        "finetune": "run_id",
        "finetune-2": "run_id",
        "evaluate": "pipeline_run",
        "register": "pipeline_run",
    }.items():
        assert tasks[name]["inputs"]["parameters"][key]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}", name


def test_params_flag_works_before_and_after_the_command(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["register"]["model_name"] = "easyref-other"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    for order in (["--params", str(tmp_path / "p.yaml"), "compile"], ["compile", "--params", str(tmp_path / "p.yaml")]):
        out = tmp_path / "full.yaml"
        assert load_full().main([*order, "--out", str(out)]) == 0
        spec = next(yaml.safe_load_all(out.read_text()))
        assert spec["root"]["inputDefinitions"]["parameters"]["model_name"]["defaultValue"] == "easyref-other"
        out.unlink()


def test_components_follow_the_pipelines_components_layout() -> None:
    """Each component folder: component.py, README.md, metadata.yaml, OWNERS and a tests/ folder."""
    folders = [p for p in sorted((ROOT / "components").iterdir()) if (p / "component.py").is_file()]
    assert {p.name for p in folders} >= {"ingest", "split_groups", "pretrain", "finetune", "evaluate", "register"}
    for folder in folders:
        meta = yaml.safe_load((folder / "metadata.yaml").read_text())
        assert meta["name"] == folder.name and meta["stability"] in ("alpha", "beta", "stable"), folder.name
        assert any(d["name"] == "Pipelines" for d in meta["dependencies"]["kubeflow"]), folder.name
        assert yaml.safe_load((folder / "OWNERS").read_text())["approvers"], folder.name
        assert (folder / "README.md").is_file() and list((folder / "tests").glob("test_*.py")), folder.name
        assert not (folder / "test_component.py").exists(), folder.name


def test_submit_parameters_parse_as_yaml() -> None:
    full = load_full()
    assert full.parse_param(["nodes=2", "sources=[s3://b/t.parquet]", "launcher=trainjob"]) == {
        "nodes": 2,
        "sources": ["s3://b/t.parquet"],
        "launcher": "trainjob",
    }
    with pytest.raises(SystemExit):
        full.parse_param(["nodes"])


@pytest.mark.slow
def test_local_runs_the_whole_pipeline_in_kfp_local(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"]["base_models"] = str(tmp_path / "models" / "tiny")
    params["data"]["sources"] = [str(tmp_path / "data" / "raw")]
    params["register"]["model_name"] = "easyref-local-test"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    fast_params(params_file)
    env = tool_env(tmp_path)
    # under 2 min on a free 2-core machine; past 20 min it has hung: stop it with each process's stack in the log
    done = run_watched(
        [sys.executable, str(ROOT / "pipelines" / "full.py"), "--params", str(params_file), "local",
         "--workdir", str(tmp_path / "kfp")],
        log=tmp_path / "full-local.log", timeout_s=1200, cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "local run finished" in done.stdout
    root = tmp_path / "kfp" / "kfp-outputs"
    metrics = next(root.rglob("evaluate/evaluation/metrics.json"))
    assert "easyref.clip_i" in json.loads(metrics.read_text())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias("easyref-local-test", "champion").version) == "1"
    # one MLflow run for the pipeline execution, the five stages nested under it
    runs = client.search_runs([client.get_experiment_by_name("easyref-pipeline").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("easyref.role") == "pipeline"]
    stages = sorted(
        r.data.tags["easyref.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    )
    assert (
        stages == ["evaluate", "multi_ref", "pretrain", "register", "single_ref"] and parent.info.status == "FINISHED"
    )
