"""The TrainJob `easyref launch` renders: every --api form is valid for the Trainer version it claims (the CRD
schemas of kubeflow/trainer under tests/data/trainer-crds), its pods are restricted, and the NetworkPolicies select
the labels its pods really carry."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "tests" / "data" / "trainer-crds"
FORMS = {
    "runtime-patches": ["v2.2.1", "v2.3.0"],
    "pod-template-overrides": ["v2.1.0"],
    "pod-spec-overrides": ["v2.0.1"],
}


def strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it: unknown fields are errors (structural schemas reject them,
    unless x-kubernetes-preserve-unknown-fields), so objects with properties get ``additionalProperties: false``."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validator(version: str):
    import jsonschema

    data = json.loads((CRDS / f"trainjob-{version}.json").read_text())
    assert data["source"]["tag"] == version and data["source"]["repository"].endswith("kubeflow/trainer")
    schema = strict(data["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is validated by the API server itself
    return jsonschema.Draft7Validator(schema)


def errors(version: str, manifest: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(version).iter_errors(manifest)]


def render(api: str = "runtime-patches", **kw: Any) -> dict:
    from easyref.train.launch import LaunchConfig, render_trainjob

    cfg = dict(
        name="easyref-pretrain-abc",
        namespace="easyref",
        image="easyref:0.1.0",
        command=["torchrun", "-m", "easyref.cli", "train"],
        nodes=2,
        gpus_per_node=8,
        pvc="easyref-shared",
        mount_path="/mnt/easyref",
        cpu="32",
        memory="256Gi",
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        secret_env={"MLFLOW_TRACKING_PASSWORD": ("easyref-mlflow", "password")},
        api=api,
    )
    return render_trainjob(LaunchConfig(**(cfg | kw)))


def test_custom_resources_of_the_pipeline_have_the_trainer_structure() -> None:
    """The TrainJob the training components create (through `easyref launch`) is a well-formed custom resource."""
    job = render()
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {
        "name": "easyref-torch-distributed", "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime"
    }
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = {v["name"]: v for v in pod["template"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "easyref-shared"


@pytest.mark.parametrize(("api", "version"), [(a, v) for a, vs in FORMS.items() for v in vs])
def test_every_launch_form_is_valid_for_the_trainer_version_it_claims(api: str, version: str) -> None:
    assert errors(version, render(api)) == []


def test_a_form_is_refused_by_the_other_trainer_versions() -> None:
    """The schemas do catch a wrong form: each is rejected by the versions it does not claim, and the flat
    podTemplateOverrides that launch rendered before (volumes/containers beside targetJobs) is invalid for 2.1."""
    for api, versions in FORMS.items():
        for other in {v for vs in FORMS.values() for v in vs} - set(versions):
            assert errors(other, render(api)), (api, other)
    flat = render("pod-template-overrides")
    override = flat["spec"]["podTemplateOverrides"][0]
    override.update(override.pop("spec"))
    assert any("Additional properties" in e for e in errors("v2.1.0", flat))


def pod_of(job: dict, index: int = 0) -> dict:
    """The pod a TrainJob's node becomes: the runtime's pod template, our patch merged in, then the labels the
    JobSet controller adds to every child Job's pod template (kubernetes-sigs/jobset,
    pkg/controllers/jobset_controller.go, labelAndAnnotateObject; Trainer names the JobSet after the TrainJob)."""
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    template = copy.deepcopy(patch["template"]["spec"]["template"])
    name = job["metadata"]["name"]
    template["metadata"]["labels"].update(
        {
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": patch["name"],
            "jobset.sigs.k8s.io/job-index": str(index),
            "jobset.sigs.k8s.io/restart-attempt": "0",
            "batch.kubernetes.io/job-name": f"{name}-{patch['name']}-{index}",
        }
    )
    return template


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
        }[op]
        if not ok:
            return False
    return True


def policies() -> dict[str, dict]:
    docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "networkpolicy.yaml").read_text())
    return {d["metadata"]["name"]: d["spec"] for d in docs if d}


def test_network_policies_let_the_nodes_of_a_trainjob_reach_each_other() -> None:
    job = render()
    first, second = pod_of(job, 0)["metadata"]["labels"], pod_of(job, 1)["metadata"]["labels"]
    nodes = policies()["easyref-trainjob-nodes"]
    assert selects(nodes["podSelector"], first) and selects(nodes["podSelector"], second)
    assert selects(nodes["ingress"][0]["from"][0]["podSelector"], second)
    assert selects(nodes["egress"][0]["to"][0]["podSelector"], second)
    # no policy selects a label Trainer never sets
    assert "trainer.kubeflow.org/trainjob-name" not in json.dumps(policies())


def test_every_policy_selects_only_this_projects_pods() -> None:
    """Installed into a shared namespace, the policies leave other workloads alone."""
    other = {"app": "someone-elses", "jobset.sigs.k8s.io/jobset-name": "their-trainjob"}
    for name, spec in policies().items():
        assert spec["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/part-of") == "easyref", name
        assert not selects(spec["podSelector"], other), name
    task = {"app.kubernetes.io/part-of": "easyref", "app.kubernetes.io/component": "pipeline-task"}
    egress = {n for n, s in policies().items() if "Egress" in s["policyTypes"] and selects(s["podSelector"], task)}
    assert {
        "easyref-default-deny",
        "easyref-egress-dns",
        "easyref-egress-mlflow",
        "easyref-egress-kubernetes-api",
        "easyref-egress-kubeflow-pipelines",
    } <= egress


def test_trainjob_pods_run_restricted_with_a_read_only_root() -> None:
    from easyref.train.launch import CONTAINER_SECURITY, POD_SECURITY

    pod = pod_of(render())["spec"]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    container = pod["containers"][0]
    assert container["securityContext"] == CONTAINER_SECURITY and POD_SECURITY["runAsUser"] != 0
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/mnt/easyref"} <= mounts
    env = {e["name"]: e for e in render()["spec"]["trainer"]["env"]}
    assert env["HOME"]["value"] == "/tmp" and "valueFrom" in env["MLFLOW_TRACKING_PASSWORD"]
