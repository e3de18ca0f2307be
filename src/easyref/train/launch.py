"""Render (--dry-run) or create (--submit) a Kubeflow Trainer v2 TrainJob that runs `easyref train` on N nodes.

The job runs on the `easyref-torch-distributed` TrainingRuntime that infra/k8s ships into the namespace (a copy of
Trainer's `torch-distributed` with the restricted securityContext, the pod labels the NetworkPolicies select, the
Istio opt-out, /tmp and /dev/shm): the Trainer starts one pod per node and sets torchrun's PET_* variables, so the
container runs `torchrun -m easyref.cli train ...` and the entry point reads RANK / WORLD_SIZE / LOCAL_RANK like
everywhere else. Secrets reach the container as environment variables (secretKeyRef), the run folder lives on a
PersistentVolumeClaim shared by all nodes (checkpoints must be visible to every rank for resume), and /dev/shm is a
memory-backed emptyDir for the data-loader workers and NCCL. The names below are the ones infra/k8s creates
(tests/test_cluster_defaults.py keeps them in step):

  easyref launch --stage pretrain --nodes 2 --gpus-per-node 8 --image ghcr.io/org/easyref:0.1 \\
      --pvc easyref-shared --mount-path /mnt/easyref --out /mnt/easyref/runs/pretrain --cpu 32 --memory 256Gi \\
      --env MLFLOW_TRACKING_URI=http://mlflow.easyref.svc.cluster.local:5000 \\
      --secret-env MLFLOW_TRACKING_USERNAME=easyref-mlflow:username \\
      --secret-env MLFLOW_TRACKING_PASSWORD=easyref-mlflow:password --dry-run
  ... --submit            # create it through the Kubernetes API (kubeconfig, or in-cluster service account)

Volumes, mounts, pod labels and the restricted securityContext also go through `runtimePatches` (Trainer >= 2.2),
so that form runs on the stock `torch-distributed` ClusterTrainingRuntime too (`--runtime torch-distributed
--runtime-kind ClusterTrainingRuntime`). Older Trainers take another form (`--api`): `pod-template-overrides`
renders `podTemplateOverrides[].spec` and `.metadata` (Trainer 2.1), `pod-spec-overrides` renders
`podSpecOverrides[]` (Trainer 2.0). Neither accepts a securityContext (their CRD schemas have none) and 2.0 cannot
label the pods: there the shipped runtime provides both (the namespace's Pod Security Admission `restricted`
refuses the stock runtime's pods). Every form is validated against the TrainJob CRD schema of its Trainer version,
the runtime against the TrainingRuntime schemas (tests/data/trainer-crds). Arguments after `--` go to `easyref
train`.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any

from easyref.errors import UserError
from easyref.train.config import STAGES

HELP = "render or submit a Kubeflow Trainer TrainJob running `easyref train`"
GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE = "node"  # replicated job and container name of the torch-distributed runtime
PATCH_MANAGER = "easyref.launch"
API_FORMS = {
    "runtime-patches": "Trainer >= 2.2",
    "pod-template-overrides": "Trainer 2.1",
    "pod-spec-overrides": "Trainer 2.0",
}
ISTIO_OPT_OUT = {"sidecar.istio.io/inject": "false"}
"""Pod label that keeps Istio's sidecar out (Kubeflow profile namespaces are labelled ``istio-injection: enabled``):
a sidecar keeps a finished Job's pod running, and its istio-init container needs NET_ADMIN, which ``restricted``
refuses (docs/orchestration.md, "Istio")."""
POD_LABELS = {"app.kubernetes.io/part-of": "easyref", "app.kubernetes.io/component": "trainjob-node", **ISTIO_OPT_OUT}
"""Labels of every TrainJob pod (infra/k8s/networkpolicy.yaml selects them, with JobSet's jobset-name label)."""
NAMESPACE, PVC, MOUNT_PATH = "easyref", "easyref-shared", "/mnt/easyref"
"""The namespace and shared volume infra/k8s creates (params.yaml cluster.namespace, shared_pvc, mount_path)."""
RUNTIME, RUNTIME_KIND = "easyref-torch-distributed", "TrainingRuntime"
"""The runtime infra/k8s/trainingruntime.yaml ships into that namespace."""
RUNTIME_KINDS = ("TrainingRuntime", "ClusterTrainingRuntime")
RUN_AS = 10001  # the image's user (infra/Dockerfile; params.yaml cluster.run_as_user)
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(kw_only=True)
class LaunchConfig:
    """One TrainJob."""

    name: str
    """TrainJob name (RFC 1035 label, at most 63 characters)."""
    namespace: str = NAMESPACE
    """Namespace of the TrainJob (and of its Secrets, PVC and TrainingRuntime)."""
    image: str
    """Container image with the easyref package installed (infra/)."""
    command: list[str]
    """The trainer container's command (torchrun ... easyref train ...)."""
    nodes: int = 1
    """Training nodes (pods)."""
    gpus_per_node: int = 8
    """nvidia.com/gpu per node; also the processes per node."""
    cpu: str = ""
    """CPU request and limit per node (empty = unset)."""
    memory: str = ""
    """Memory request and limit per node (empty = unset)."""
    shm_size: str = "64Gi"
    """Size limit of the memory-backed /dev/shm."""
    pvc: str = ""
    """PersistentVolumeClaim with the data, base models and run folders (empty = none)."""
    mount_path: str = MOUNT_PATH
    """Where the PVC is mounted."""
    env: dict[str, str] = field(default_factory=dict)
    """Plain environment variables."""
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Environment variables from Secrets: NAME -> (secret name, key)."""
    runtime: str = RUNTIME
    """Training runtime to run on."""
    runtime_kind: str = RUNTIME_KIND
    """``TrainingRuntime`` (in the TrainJob's namespace) or ``ClusterTrainingRuntime``."""
    api: str = "runtime-patches"
    """How the pod is patched: ``runtime-patches`` (Trainer >= 2.2), ``pod-template-overrides`` (2.1) or
    ``pod-spec-overrides`` (2.0)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Extra metadata labels (e.g. ``kueue.x-k8s.io/queue-name``)."""

    def __post_init__(self) -> None:
        if not DNS_LABEL.match(self.name) or len(self.name) > 63:
            raise UserError(f"--name {self.name!r}: a TrainJob name must be a lowercase RFC 1035 label (<= 63 chars)")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise UserError(f"need --nodes >= 1 and --gpus-per-node >= 0, got {self.nodes}, {self.gpus_per_node}")
        if self.api not in API_FORMS:
            raise UserError(f"--api must be one of {', '.join(API_FORMS)}, got {self.api!r}")
        if self.runtime_kind not in RUNTIME_KINDS:
            raise UserError(f"--runtime-kind must be one of {', '.join(RUNTIME_KINDS)}, got {self.runtime_kind!r}")


def render_trainjob(cfg: LaunchConfig) -> dict[str, Any]:
    """The TrainJob manifest as a dict (what ``--dry-run`` prints as YAML and ``--submit`` sends)."""
    resources: dict[str, Any] = {}
    limits = {k: v for k, v in (("cpu", cfg.cpu), ("memory", cfg.memory)) if v}
    if cfg.gpus_per_node:
        limits["nvidia.com/gpu"] = cfg.gpus_per_node
    if limits:
        resources = {"limits": dict(limits), "requests": dict(limits)}
    # the root filesystem is read-only: HOME and every cache live in the /tmp volume
    plain = {"HOME": "/tmp", **cfg.env}
    env = [{"name": k, "value": v} for k, v in sorted(plain.items())]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": s, "key": key}}}
        for k, (s, key) in sorted(cfg.secret_env.items())
    ]
    trainer: dict[str, Any] = {"image": cfg.image, "command": list(cfg.command), "numNodes": cfg.nodes, "env": env}
    if cfg.gpus_per_node:
        trainer["numProcPerNode"] = cfg.gpus_per_node
    if resources:
        trainer["resourcesPerNode"] = resources

    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    if cfg.pvc:
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": cfg.pvc}})
        mounts.append({"name": "runs", "mountPath": cfg.mount_path})
    spec: dict[str, Any] = {
        "runtimeRef": {"name": cfg.runtime, "apiGroup": GROUP, "kind": cfg.runtime_kind},
        "trainer": trainer,
    }
    container: dict[str, Any] = {"name": NODE, "volumeMounts": mounts}
    target = [{"name": NODE}]
    if cfg.api == "runtime-patches":
        pod_spec = {
            "securityContext": POD_SECURITY,
            "volumes": volumes,
            "containers": [{**container, "securityContext": CONTAINER_SECURITY}],
        }
        job = {
            "name": NODE,
            "template": {"spec": {"template": {"metadata": {"labels": dict(POD_LABELS)}, "spec": pod_spec}}},
        }
        spec["runtimePatches"] = [
            {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}
        ]
    elif cfg.api == "pod-template-overrides":
        spec["podTemplateOverrides"] = [
            {
                "targetJobs": target,
                "metadata": {"labels": dict(POD_LABELS)},
                "spec": {"volumes": volumes, "containers": [container]},
            }
        ]
    else:
        spec["podSpecOverrides"] = [{"targetJobs": target, "volumes": volumes, "containers": [container]}]
    labels = {"app.kubernetes.io/name": "easyref", "app.kubernetes.io/component": "train", **cfg.labels}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": cfg.name, "namespace": cfg.namespace, "labels": labels},
        "spec": spec,
    }


def submit(manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the TrainJob through the Kubernetes API (kubeconfig first, then the in-cluster service account)."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config()
    except (ConfigException, FileNotFoundError, TypeError):
        try:
            config.load_incluster_config()
        except ConfigException as exc:
            raise UserError("no Kubernetes credentials: set KUBECONFIG or run inside the cluster") from exc
    api = client.CustomObjectsApi()
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, manifest["metadata"]["namespace"], PLURAL, manifest)
    except ApiException as exc:
        raise UserError(
            f"creating TrainJob {manifest['metadata']['name']} failed: {exc.status} {exc.reason}: {exc.body}"
        ) from exc


def train_command(args: argparse.Namespace) -> list[str]:
    """``torchrun -m easyref.cli train ...``: torchrun takes nodes, processes and rendezvous from PET_* variables."""
    cmd = ["torchrun", "-m", "easyref.cli", "train", "--stage", args.stage, "--out", args.out]
    if args.params:
        cmd += ["--params", args.params]
    if args.init:
        cmd += ["--init", args.init]
    extra = list(args.train_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    return cmd + extra


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise UserError(f"{flag} {v!r}: expected NAME=VALUE")
        out[name] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, required=True, help="the training stage")
    parser.add_argument("--out", required=True, help="run folder inside the pod (on the PVC)")
    parser.add_argument("--init", help="previous stage's final checkpoint inside the pod")
    parser.add_argument("--params", help="parameters file inside the pod (default: the image's params.yaml)")
    parser.add_argument("--name", help="TrainJob name (default: easyref-<stage>)")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"namespace of the TrainJob (default {NAMESPACE})")
    parser.add_argument("--image", required=True, help="container image with easyref installed")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= processes) per node (default 8)")
    parser.add_argument("--cpu", default="", help="CPU per node, e.g. 32")
    parser.add_argument("--memory", default="", help="memory per node, e.g. 512Gi")
    parser.add_argument("--shm-size", default="64Gi", help="size of /dev/shm (default 64Gi)")
    parser.add_argument("--pvc", default="", help=f"PersistentVolumeClaim holding data, models and runs ({PVC})")
    parser.add_argument("--mount-path", default=MOUNT_PATH, help=f"where the PVC is mounted (default {MOUNT_PATH})")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable")
    parser.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME=SECRET:KEY",
        help="environment variable from a Secret's key",
    )
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="extra metadata label")
    parser.add_argument("--runtime", default=RUNTIME, help=f"training runtime (default {RUNTIME}, infra/k8s)")
    parser.add_argument(
        "--runtime-kind", default=RUNTIME_KIND, choices=RUNTIME_KINDS, help=f"its kind (default {RUNTIME_KIND})"
    )
    parser.add_argument(
        "--api",
        default="runtime-patches",
        choices=list(API_FORMS),
        help="how the pod is patched: " + ", ".join(f"{k} ({v})" for k, v in API_FORMS.items()),
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the manifest (the default)")
    mode.add_argument("--submit", action="store_true", help="create the TrainJob in the cluster")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then extra `easyref train` flags")


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    secrets = {}
    for name, ref in _pairs(args.secret_env, "--secret-env").items():
        secret, sep, key = ref.partition(":")
        if not sep or not secret or not key:
            raise UserError(f"--secret-env {name}={ref}: expected NAME=SECRET:KEY")
        secrets[name] = (secret, key)
    return LaunchConfig(
        name=args.name or f"easyref-{args.stage.replace('_', '-')}",
        namespace=args.namespace,
        image=args.image,
        command=train_command(args),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpu=args.cpu,
        memory=args.memory,
        shm_size=args.shm_size,
        pvc=args.pvc,
        mount_path=args.mount_path,
        env=_pairs(args.env, "--env"),
        secret_env=secrets,
        runtime=args.runtime,
        runtime_kind=args.runtime_kind,
        api=args.api,
        labels=_pairs(args.label, "--label"),
    )


def run(args: argparse.Namespace) -> int:
    import yaml

    manifest = render_trainjob(config_from_args(args))
    if args.submit:
        created = submit(manifest)
        meta = created.get("metadata", {})
        print(f"created TrainJob {meta.get('namespace')}/{meta.get('name')}")
    else:
        print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0
