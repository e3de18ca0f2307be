"""The `easyref launch` examples (docs/training.md, the module's docstring) and defaults name what infra/k8s creates:
namespace, shared volume, Secrets and their keys, the MLflow Service and its basic auth, the training runtime. Each
example is parsed by launch's own parser and rendered, then checked against the kustomize build, so they cannot
drift from the manifests again."""

from __future__ import annotations

import argparse
import re
import shlex
from urllib.parse import urlparse

import pytest
import yaml
from test_infra import ROOT, kustomize_build, secret_templates

OLD_EXAMPLE = """easyref launch --stage pretrain --nodes 4 --gpus-per-node 8 --image ghcr.io/ORG/easyref:0.1 \\
  --pvc easyref-runs --mount-path /mnt --params /mnt/params.yaml --out /mnt/runs/pretrain \\
  --env MLFLOW_TRACKING_URI=http://mlflow.mlflow:5000 \\
  --secret-env AWS_ACCESS_KEY_ID=s3-credentials:access_key --secret-env AWS_SECRET_ACCESS_KEY=s3-credentials:secret_key \\
  --namespace default --dry-run -- --max-steps 300000"""
"""The example these docs carried before: every name in it was wrong for infra/k8s."""


def examples() -> dict[str, str]:
    """``{where: command}`` of every `easyref launch` example in the docs and the module docstring."""
    from easyref.train import launch

    found = {}
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), re.S)
    for i, block in enumerate(b for b in blocks if "easyref launch" in b):
        found[f"docs/training.md#{i}"] = block
    doc = launch.__doc__ or ""
    start = doc.index("  easyref launch")
    lines = []
    for line in doc[start:].splitlines():
        lines.append(line)
        if not line.rstrip().endswith("\\"):
            break
    found["launch.py docstring"] = "\n".join(lines)
    return found


def parse(command: str) -> argparse.Namespace:
    from easyref.train.launch import add_arguments

    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["easyref", "launch"], argv[:2]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv[2:])


def problems(args: argparse.Namespace) -> list[str]:
    """Where a parsed `easyref launch` command disagrees with infra/k8s and params.yaml (empty: it agrees)."""
    from easyref.train.launch import config_from_args, render_trainjob

    build = kustomize_build()
    namespace = yaml.safe_load((ROOT / "infra" / "k8s" / "kustomization.yaml").read_text())["namespace"]
    cluster = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    job = render_trainjob(config_from_args(args))
    out = []
    if job["metadata"]["namespace"] != namespace:
        out.append(f"namespace {job['metadata']['namespace']!r}: infra/k8s installs into {namespace!r}")
    pvcs = {d["metadata"]["name"] for d in build if d["kind"] == "PersistentVolumeClaim"}
    if args.pvc not in pvcs:
        out.append(f"--pvc {args.pvc!r}: infra/k8s creates {sorted(pvcs)}")
    if args.mount_path != cluster["mount_path"]:
        out.append(f"--mount-path {args.mount_path!r}: the pipeline mounts it at {cluster['mount_path']!r}")
    for flag in ("out", "params"):
        value = getattr(args, flag)
        if value and not value.startswith(args.mount_path.rstrip("/") + "/"):
            out.append(f"--{flag} {value!r} is not on the shared volume ({args.mount_path})")
    secrets = {s["metadata"]["name"]: set(s["stringData"]) for s in secret_templates()}
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    for name, item in env.items():
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["key"] not in secrets.get(ref["name"], set()):
            out.append(f"{name}: Secret {ref['name']}:{ref['key']} is not one infra/k8s documents ({secrets})")
    mlflow = next(d for d in build if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    service = next(d for d in build if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    uri = urlparse(env.get("MLFLOW_TRACKING_URI", {}).get("value", ""))
    hosts = {f"mlflow.{namespace}{suffix}" for suffix in ("", ".svc", ".svc.cluster.local")} | {"mlflow"}
    if uri.hostname not in hosts or uri.port != service["spec"]["ports"][0]["port"]:
        out.append(f"MLFLOW_TRACKING_URI {uri.geturl()!r}: the MLflow Service is mlflow.{namespace}:5000")
    if "--app-name=basic-auth" in mlflow["spec"]["template"]["spec"]["containers"][0]["args"]:
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
            if ref != {"name": cluster["mlflow_secret"], "key": key}:
                out.append(f"{var}: MLflow has basic auth on; take it from {cluster['mlflow_secret']}:{key}")
    runtime = job["spec"]["runtimeRef"]
    runtimes = {(d["kind"], d["metadata"]["name"]) for d in build if d["kind"].endswith("TrainingRuntime")}
    if (runtime["kind"], runtime["name"]) not in runtimes | {("ClusterTrainingRuntime", "torch-distributed")}:
        out.append(f"runtime {runtime['kind']}/{runtime['name']} is neither infra/k8s's nor Trainer's")
    return out


@pytest.mark.parametrize("where", sorted(examples()))
def test_every_launch_example_names_what_infra_k8s_creates(where: str) -> None:
    assert problems(parse(examples()[where])) == []


def test_a_drifted_example_is_caught() -> None:
    found = "\n".join(problems(parse(OLD_EXAMPLE)))
    for wrong in ("'default'", "easyref-runs", "/mnt", "s3-credentials", "mlflow.mlflow", "MLFLOW_TRACKING_PASSWORD"):
        assert wrong in found, wrong


def test_defaults_are_the_installed_namespace_and_runtime() -> None:
    """With no --namespace, --mount-path, --runtime, --runtime-kind a TrainJob lands where infra/k8s put the
    runtime, with the volume where the pipeline mounts it; the pipeline's StageRequest and params.yaml agree."""
    from components.training import StageRequest
    from easyref.train.launch import MOUNT_PATH, NAMESPACE, PVC, RUNTIME, RUNTIME_KIND

    args = parse(f"easyref launch --stage pretrain --image i --out {MOUNT_PATH}/o --pvc {PVC}")
    assert (args.namespace, args.runtime, args.runtime_kind) == (NAMESPACE, RUNTIME, RUNTIME_KIND)
    assert args.mount_path == MOUNT_PATH
    left = problems(args)  # only what a command must name itself: MLflow's address and credentials
    assert left and all(p.startswith("MLFLOW_TRACKING_") for p in left), left
    cluster = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    assert (cluster["namespace"], cluster["shared_pvc"], cluster["mount_path"]) == (NAMESPACE, PVC, MOUNT_PATH)
    assert StageRequest.__dataclass_fields__["namespace"].default == NAMESPACE
    assert urlparse(cluster["mlflow_tracking_uri"]).hostname == f"mlflow.{NAMESPACE}.svc.cluster.local"
