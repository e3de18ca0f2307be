"""The TrainingRuntime infra/k8s ships (easyref-torch-distributed): valid for every Trainer release's CRD, and the pod
each `easyref launch --api` form becomes on it passes the Pod Security Standard `restricted` (which the namespace
enforces), carries the labels the NetworkPolicies select and opts out of Istio's sidecar. The Trainer 2.0/2.1 forms
on the stock `torch-distributed` runtime do not: that is what the shipped runtime is for."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from test_infra import ROOT, kustomize_build
from test_trainjob import CRDS, FORMS, policies, render, selects, strict

VERSIONS = sorted({v for vs in FORMS.values() for v in vs})
MERGE_KEYS = {
    "volumes": "name",
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "replicatedJobs": "name",
    "volumeMounts": "mountPath",
}
"""Lists that a strategic merge patch merges item by item, and their patchMergeKey (Kubernetes' core/v1 types)."""
STOCK = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed"},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": "node",
                        "template": {
                            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                            "spec": {"template": {"spec": {"containers": [{"name": "node", "image": "pytorch"}]}}},
                        },
                    }
                ]
            }
        },
    },
}
"""The shape of Trainer's own `torch-distributed` ClusterTrainingRuntime (kubeflow/trainer,
manifests/base/runtimes/torch_distributed.yaml at v2.0.1 to v2.3.0): a `node` job, a `node` container, no
securityContext, no pod labels."""


def shipped_runtime() -> dict:
    found = [d for d in kustomize_build() if d["kind"] == "TrainingRuntime"]
    assert len(found) == 1
    return found[0]


def runtime_errors(version: str, runtime: dict) -> list[str]:
    import jsonschema

    data = json.loads((CRDS / f"trainingruntime-{version}.json").read_text())
    assert data["source"]["tag"] == version and data["source"]["crd"] == "trainingruntimes.trainer.kubeflow.org"
    schema = strict(data["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(runtime)]


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as Trainer applies the TrainJob's overrides (k8s.io/apimachinery strategicpatch):
    mappings merge key by key, the lists above merge item by item by their merge key, other values are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key in MERGE_KEYS and isinstance(value, list) and isinstance(out.get(key), list):
                by = MERGE_KEYS[key]
                items = {item[by]: item for item in out[key]}
                for item in value:
                    items[item[by]] = merge(items[item[by]], item) if item[by] in items else item
                out[key] = list(items.values())
            else:
                out[key] = merge(out.get(key), value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def node_pod(job: dict, runtime: dict, index: int = 0) -> dict:
    """The pod template of a TrainJob node: the runtime's `node` job with the job's overrides merged in the way of
    its form (Trainer 2.0 podSpecOverrides onto the pod spec, 2.1 podTemplateOverrides onto the pod template,
    >= 2.2 runtimePatches onto the Job template), the trainer's container settings, then JobSet's pod labels."""
    spec = job["spec"]
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    rjob = copy.deepcopy(next(j for j in jobs if j["name"] == "node"))
    for override in spec.get("podSpecOverrides", []):
        assert {"name": "node"} in override["targetJobs"]
        patch = {k: v for k, v in override.items() if k != "targetJobs"}
        rjob["template"]["spec"]["template"]["spec"] = merge(rjob["template"]["spec"]["template"]["spec"], patch)
    for override in spec.get("podTemplateOverrides", []):
        assert {"name": "node"} in override["targetJobs"]
        patch = {k: v for k, v in override.items() if k in ("metadata", "spec")}
        rjob["template"]["spec"]["template"] = merge(rjob["template"]["spec"]["template"], patch)
    for runtime_patch in spec.get("runtimePatches", []):
        for patch in runtime_patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if patch["name"] == "node":
                rjob["template"] = merge(rjob["template"], patch["template"])
    pod = rjob["template"]["spec"]["template"]
    trainer = spec["trainer"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "node")
    container.update(image=trainer["image"], command=trainer["command"], resources=trainer.get("resourcesPerNode"))
    container["env"] = merge({"env": container.get("env", [])}, {"env": trainer.get("env", [])})["env"]
    name = job["metadata"]["name"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(
        {
            "jobset.sigs.k8s.io/jobset-name": name,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "jobset.sigs.k8s.io/job-index": str(index),
        }
    )
    return pod


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security Standard `restricted` (kubernetes.io/docs/concepts/security/pod-security-standards)
    refuses in a pod template: the baseline rules that a pod template can break, then the restricted ones."""
    spec, out = pod["spec"], []
    pod_ctx = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(key)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    if pod_ctx.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    pod_seccomp = (pod_ctx.get("seccompProfile") or {}).get("type")
    for c in spec.get("initContainers", []) + spec["containers"]:
        ctx, name = c.get("securityContext") or {}, c["name"]
        if ctx.get("privileged"):
            out.append(f"{name}: privileged")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        if ctx.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps['add']}")
        if not ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        if (ctx.get("seccompProfile") or {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_the_shipped_runtime_is_valid_for_every_trainer_release(version: str) -> None:
    assert runtime_errors(version, shipped_runtime()) == []


def test_the_runtime_schemas_catch_a_wrong_runtime() -> None:
    """The check can fail: a misplaced securityContext (on the Job template, not the pod's) is refused."""
    bad = copy.deepcopy(shipped_runtime())
    job = bad["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    job["securityContext"] = job["template"]["spec"]["securityContext"]
    for version in VERSIONS:
        assert any("securityContext" in e for e in runtime_errors(version, bad)), version


def test_the_runtime_carries_what_launch_patches() -> None:
    """One source of truth: the runtime's pod labels and security contexts are launch's (and the image's user)."""
    from easyref.train.launch import CONTAINER_SECURITY, NODE, POD_LABELS, POD_SECURITY, RUNTIME, RUNTIME_KIND

    runtime = shipped_runtime()
    assert (runtime["kind"], runtime["metadata"]["name"]) == (RUNTIME_KIND, RUNTIME)
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == POD_LABELS
    assert pod["spec"]["securityContext"] == POD_SECURITY
    container = next(c for c in pod["spec"]["containers"] if c["name"] == NODE)
    assert container["securityContext"] == CONTAINER_SECURITY
    run_as = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]["run_as_user"]
    assert pod["spec"]["securityContext"]["runAsUser"] == run_as


@pytest.mark.parametrize("api", list(FORMS))
def test_every_form_on_the_shipped_runtime_is_restricted_labelled_and_out_of_the_mesh(api: str) -> None:
    job = render(api)
    pod = node_pod(job, shipped_runtime())
    assert restricted_violations(pod) == []
    labels = pod["metadata"]["labels"]
    assert labels["sidecar.istio.io/inject"] == "false"
    named = policies()
    mlflow_ingress = named["easyref-mlflow-from-project"]["ingress"][0]["from"][0]["podSelector"]
    assert selects(mlflow_ingress, labels) and selects(named["easyref-egress-mlflow"]["podSelector"], labels)
    assert selects(named["easyref-trainjob-nodes"]["podSelector"], labels)
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/mnt/easyref"} <= mounts
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "easyref-shared"
    assert len(volumes) == len(pod["spec"]["volumes"])  # the job's dshm/tmp merged into the runtime's, by name
    assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "32"


def test_shm_size_of_the_job_replaces_the_runtimes() -> None:
    pod = node_pod(render("pod-spec-overrides", shm_size="8Gi"), shipped_runtime())
    dshm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_old_forms_on_the_stock_runtime_are_refused_and_unlabelled() -> None:
    """Why the runtime is shipped: on Trainer's own runtime the 2.0/2.1 forms break `restricted` (and 2.0's pods
    carry no project label, so MLflow's ingress policy refuses them); runtime-patches alone is enough there."""
    for api in ("pod-spec-overrides", "pod-template-overrides"):
        pod = node_pod(render(api, runtime="torch-distributed", runtime_kind="ClusterTrainingRuntime"), STOCK)
        assert any("runAsNonRoot" in v for v in restricted_violations(pod)), api
        assert any("allowPrivilegeEscalation" in v for v in restricted_violations(pod)), api
    pod = node_pod(render("pod-spec-overrides"), STOCK)
    mlflow_ingress = policies()["easyref-mlflow-from-project"]["ingress"][0]["from"][0]["podSelector"]
    assert not selects(mlflow_ingress, pod["metadata"]["labels"])
    assert restricted_violations(node_pod(render("runtime-patches"), STOCK)) == []


def test_the_restricted_check_refuses_what_the_standard_refuses() -> None:
    base = node_pod(render(), shipped_runtime())
    for change, expected in (
        (lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda p: p["spec"]["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda p: p["spec"]["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]), "adds"),
        (lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda p: p["spec"]["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "Escalation"),
    ):
        pod = copy.deepcopy(base)
        change(pod)
        assert any(expected in v for v in restricted_violations(pod)), expected
