"""The whole EasyRef pipeline for Kubeflow Pipelines: ingest -> split -> pretrain -> finetune (single, multi) ->
evaluate -> register.

  python pipelines/full.py compile --out full.yaml             # the package; then:
  kfp --endpoint URL run create --experiment-name easyref --package-file full.yaml
  python pipelines/full.py submit --host URL [--param nodes=2]  # compile and submit through kfp.Client
  python pipelines/full.py local                                # run it in kfp.local on this CPU (tiny profile)

Parameter defaults come from params.yaml (the file `dvc repro` reads too): the `ingest`, `split`, `train`,
`evaluate` and `register` sections are passed to the components as dict parameters, and `cluster` holds the
Kubernetes settings. On a cluster every task mounts the shared ReadWriteMany volume (`cluster.shared_pvc`), gets
the MLflow and S3 credentials from Secrets as environment variables, CPU and memory requests and limits
(`cluster.task_resources`), runs as the image's non-root user and carries the labels the NetworkPolicies select
(infra/k8s/networkpolicy.yaml). The launcher is chosen when compiling (`--launcher`, default `cluster.launcher`),
because it decides the training pods' shape: with `trainjob` the training tasks are small CPU pods that submit a
Kubeflow Trainer TrainJob of `nodes` x `gpus_per_node` GPUs and wait for it; with `torchrun` they train in their own
pod and get `pod_gpus` GPUs, GPU node selectors and tolerations and a memory-backed /dev/shm. Ingest and evaluate
are retried on failure (transient: object store, network, a preempted node). With `ingest.shards` (or `--shards`)
K > 1, ingest fans out: a `dsl.ParallelFor` runs K ingest tasks (one shard of the images each, a pod each) and an
`ingest_merge` task builds the one ingested dataset from them (docs/data.md). `local` always runs one ingest task:
kfp.local does not run ParallelFor.
"""

# ruff: noqa: B006 - KFP pipeline parameter defaults are JSON values (lists, dicts)
# no `from __future__ import annotations`: KFP reads the pipeline's annotations as types
import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PIPELINE_NAME = "easyref-full"
TRAINING_TASKS = ("pretrain", "finetune-single-ref", "finetune-multi-ref")
SHM_SIZE = "64Gi"
LAUNCHERS = ("trainjob", "torchrun")
POD_LABELS = {
    "app.kubernetes.io/part-of": "easyref",
    "app.kubernetes.io/component": "pipeline-task",
    "sidecar.istio.io/inject": "false",
}
"""Labels of every task pod: infra/k8s/networkpolicy.yaml selects them; the last keeps Istio's sidecar out in a
Kubeflow profile namespace (as KFP's own default annotation does; docs/orchestration.md, "Istio")."""
REGISTRY_LOCK_DIR = "locks/registry"
"""Where, under the shared volume's mount path, the register task takes the registry lock (``register.lock_dir``):
every pod that registers sees the same lock, so registrations from several pods are serialised."""
RETRY = {"num_retries": 3, "backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    missing = [
        k for k in ("profile", "data", "ingest", "split", "train", "evaluate", "register", "cluster") if k not in data
    ]
    if missing:
        raise SystemExit(f"{path}: missing section(s) {', '.join(missing)}")
    return data


def without_nulls(value: Any) -> Any:
    """KFP parameter defaults cannot hold null: drop null keys (an unset key means the command's default)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def trainjob_secret_env(cluster: dict[str, Any]) -> list[str]:
    """``ENV=SECRET:KEY`` entries: the MLflow and S3 credentials a TrainJob's pods get from the Secrets."""
    mlflow_secret, s3_secret = cluster["mlflow_secret"], cluster["s3_secret"]
    return [
        f"MLFLOW_TRACKING_USERNAME={mlflow_secret}:username",
        f"MLFLOW_TRACKING_PASSWORD={mlflow_secret}:password",
        f"AWS_ACCESS_KEY_ID={s3_secret}:access_key_id",
        f"AWS_SECRET_ACCESS_KEY={s3_secret}:secret_access_key",
        f"MLFLOW_S3_ENDPOINT_URL={s3_secret}:endpoint_url",
        f"AWS_ENDPOINT_URL={s3_secret}:endpoint_url",
    ]


def on_cluster(task, cluster: dict[str, Any], pvc, size: str):
    """Secrets as env, the shared volume, resources, labels, non-root user (ignored by kfp.local)."""
    from kfp import kubernetes

    resources = cluster["task_resources"]
    mlflow_secret, s3_secret = cluster["mlflow_secret"], cluster["s3_secret"]
    cpu, memory = str(resources[size]["cpu"]), str(resources[size]["memory"])
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    for key, value in POD_LABELS.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    # kfp-kubernetes sets the identity; the KFP backend drops capabilities and sets allowPrivilegeEscalation
    # false and seccomp RuntimeDefault; the namespace's Pod Security Admission (restricted) refuses any pod
    # without them (infra/k8s/namespace.yaml)
    user = int(cluster["run_as_user"])
    kubernetes.set_security_context(task, run_as_user=user, run_as_group=user, run_as_non_root=True)
    kubernetes.use_secret_as_env(
        task,
        secret_name=mlflow_secret,
        secret_key_to_env={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=s3_secret,
        secret_key_to_env={
            "access_key_id": "AWS_ACCESS_KEY_ID",
            "secret_access_key": "AWS_SECRET_ACCESS_KEY",
            "endpoint_url": "AWS_ENDPOINT_URL",
        },
    )
    kubernetes.use_secret_as_env(
        task, secret_name=s3_secret, secret_key_to_env={"endpoint_url": "MLFLOW_S3_ENDPOINT_URL"}
    )
    kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=cluster["mount_path"])
    return task


def on_gpus(task, cluster: dict[str, Any], pvc, gpus, size: str):
    """Shared volume and secrets, plus a GPU request, GPU nodes and a memory-backed /dev/shm."""
    from kfp import kubernetes

    on_cluster(task, cluster, pvc, size)
    task.set_accelerator_type(cluster["accelerator_type"]).set_accelerator_limit(gpus)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    kubernetes.add_node_selector(task, label_key="nvidia.com/gpu.present", label_value="true")
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task


def ingest_stage(sources, config, shards: int, cluster: dict[str, Any], pvc):
    """The task whose ``ingested`` output is the ingested dataset: one ``ingest`` task, or with ``shards`` > 1 one
    ``ingest`` task per shard in a ``dsl.ParallelFor`` (a pod each) and an ``ingest_merge`` task over them all."""
    from kfp import dsl

    from components.ingest.component import ingest
    from components.ingest_merge.component import ingest_merge

    if shards == 1:
        return on_cluster(ingest(sources=sources, config=config), cluster, pvc, "ingest").set_retry(**RETRY)
    with dsl.ParallelFor(items=list(range(shards)), name="ingest-shards") as shard:
        part = ingest(sources=sources, config=config, shard=shard, shards=shards)
        on_cluster(part, cluster, pvc, "ingest").set_retry(**RETRY).set_display_name("ingest-shard")
    merged = ingest_merge(sources=sources, shards=dsl.Collected(part.outputs["ingested"]), config=config)
    return on_cluster(merged, cluster, pvc, "ingest").set_retry(**RETRY).set_display_name("ingest-merge")


def build_pipeline(
    params: dict[str, Any], image: str | None = None, launcher: str | None = None, shards: int | None = None
):
    """The ``@dsl.pipeline`` function, its parameter defaults taken from ``params``; ``launcher`` (default
    ``cluster.launcher``) decides the training tasks' pods, ``shards`` (default ``ingest.shards``) the ingest
    tasks and ``cluster.pack_destination`` whether a pack task writes the training shards the stages stream: all
    shape the graph, so they are fixed when compiling."""
    launcher = launcher or str(params["cluster"]["launcher"])
    if launcher not in LAUNCHERS:
        raise SystemExit(f"cluster.launcher / --launcher: expected one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    shards = int(params["ingest"].get("shards", 1) if shards is None else shards)
    if shards < 1:
        raise SystemExit(f"ingest.shards / --shards: expected at least 1, got {shards}")
    if image:
        os.environ["EASYREF_IMAGE"] = image  # read by components.settings when the components are imported
    sys.path.insert(0, str(REPO_ROOT))
    from kfp import dsl

    from components.evaluate.component import evaluate
    from components.finetune.component import finetune
    from components.pack.component import pack
    from components.pretrain.component import pretrain
    from components.register.component import register
    from components.settings import BASE_IMAGE
    from components.split_groups.component import split_groups

    params = without_nulls(params)
    cluster = params["cluster"]
    mount_path = cluster["mount_path"]
    pack_to = str(cluster.get("pack_destination") or "")
    if pack_to and not pack_to.startswith("s3://"):
        raise SystemExit(f"cluster.pack_destination: expected an s3://bucket/prefix every training pod can read, "
                         f"got {pack_to!r}")

    @dsl.pipeline(name=PIPELINE_NAME, description="EasyRef: ingest, split, three training stages, evaluate, register")
    def easyref_full(
        sources: list = list(params["data"]["sources"]),
        base_models: str = str(params["profile"]["base_models"]),
        ingest_config: dict = dict(params["ingest"]),
        split_config: dict = dict(params["split"]),
        train_config: dict = dict(params["train"]),
        pretrain_steps: int = int(params["train"]["pretrain"]["max_steps"]),
        single_ref_steps: int = int(params["train"]["single_ref"]["max_steps"]),
        multi_ref_steps: int = int(params["train"]["multi_ref"]["max_steps"]),
        evaluate_config: dict = dict(params["evaluate"]),
        evaluate_split: str = "all",
        register_config: dict = dict(params["register"]),
        register_lock_dir: str = str(params["register"].get("lock_dir") or f"{mount_path}/{REGISTRY_LOCK_DIR}"),
        model_name: str = str(params["register"]["model_name"]),
        promote: bool = True,
        nodes: int = int(cluster["nodes"]),
        gpus_per_node: int = int(cluster["gpus_per_node"]),
        pod_gpus: int = int(cluster["pod_gpus"]),
        evaluate_gpus: int = int(cluster.get("evaluate_gpus", 1)),
        image: str = BASE_IMAGE,
        namespace: str = str(cluster["namespace"]),
        shared_pvc: str = str(cluster["shared_pvc"]),
        mlflow_tracking_uri: str = str(cluster["mlflow_tracking_uri"]),
    ):
        tracking = {"mlflow_tracking_uri": mlflow_tracking_uri}
        data = ingest_stage(sources, ingest_config, shards, cluster, shared_pvc)
        split = on_cluster(
            split_groups(ingested=data.outputs["ingested"], config=split_config), cluster, shared_pvc, "split"
        )
        packed = None
        if pack_to:  # the training split as WebDataset shards in object storage; the stages stream them
            packed = pack(split=split.outputs["split"], ingested=data.outputs["ingested"], destination=pack_to,
                          config=dict(params["pack"]))
            on_cluster(packed, cluster, shared_pvc, "pack").set_display_name("pack")
        common = dict(
            split=split.outputs["split"],
            ingested=data.outputs["ingested"],
            base_models=base_models,
            config=train_config,
            launcher=launcher,
            nproc=pod_gpus,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            node_resources=dict(cluster["node_resources"]),
            image=image,
            namespace=namespace,
            pvc=shared_pvc,
            mount_path=mount_path,
            secret_env=trainjob_secret_env(cluster),
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            data=pack_to,
            **tracking,
        )

        def training(task):
            """A TrainJob submitter is a small CPU pod; a torchrun task trains in its pod with GPUs and /dev/shm."""
            if packed is not None:
                task.after(packed)  # the shards it reads are written by the pack task
            if launcher == "trainjob":
                return on_cluster(task, cluster, shared_pvc, "submit")
            return on_gpus(task, cluster, shared_pvc, pod_gpus, "train")

        stage1 = training(pretrain(max_steps=pretrain_steps, **common))
        stage1.set_display_name("pretrain")
        stage2 = training(
            finetune(stage="single_ref", init=stage1.outputs["checkpoint"], max_steps=single_ref_steps, **common)
        )
        stage2.set_display_name("finetune-single-ref")
        stage3 = training(
            finetune(stage="multi_ref", init=stage2.outputs["checkpoint"], max_steps=multi_ref_steps, **common)
        )
        stage3.set_display_name("finetune-multi-ref")
        scores = evaluate(
            checkpoint=stage3.outputs["checkpoint"],
            split=split.outputs["split"],
            ingested=data.outputs["ingested"],
            base_models=base_models,
            config=evaluate_config,
            split_name=evaluate_split,
            pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            **tracking,
        )
        on_gpus(scores, cluster, shared_pvc, evaluate_gpus, "evaluate").set_display_name("evaluate")
        scores.set_retry(**RETRY)
        registration = register(
            checkpoint=stage3.outputs["checkpoint"],
            evaluation=scores.outputs["evaluation"],
            base_models=base_models,
            model_name=model_name,
            promote=promote,
            config=register_config,
            lock_dir=register_lock_dir,
            pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            **tracking,
        )
        on_cluster(registration, cluster, shared_pvc, "register").set_caching_options(enable_caching=False)

    return easyref_full


def compile_package(
    out: str | Path,
    params_file: str | Path = DEFAULT_PARAMS,
    image: str | None = None,
    launcher: str | None = None,
    shards: int | None = None,
) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(load_params(params_file), image, launcher, shards), str(out))
    return Path(out)


def parse_param(values: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is read as YAML (numbers, lists, mappings)."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param {item!r}: expected NAME=VALUE")
        out[name] = yaml.safe_load(value)
    return out


def run_local(params_file: str | Path, workdir: Path, nproc: int = 2) -> dict[str, Any]:
    """The pipeline in kfp.local on this machine: tiny models and demo data first, then every step in a subprocess."""
    import subprocess

    from kfp import local

    params = load_params(params_file)
    workdir = workdir.resolve()
    base = Path(params["profile"]["base_models"])
    base = base if base.is_absolute() else (REPO_ROOT / base)
    sources = [str(p if Path(p).is_absolute() or "://" in p else (REPO_ROOT / p)) for p in params["data"]["sources"]]
    seed = str(params["profile"].get("seed", 0))
    if params["profile"].get("name") == "tiny":
        easyref = [sys.executable, "-m", "easyref.cli"]
        subprocess.run([*easyref, "tiny-models", "--out", str(base), "--seed", seed], check=True)
        for source in sources:
            if not Path(source).exists():
                subprocess.run(
                    [
                        *easyref,
                        "demo-data",
                        "--out",
                        source,
                        "--seed",
                        seed,
                        "--min-images",
                        str(params["data"].get("demo_groups_min_images", 4)),
                        "--max-images",
                        str(params["data"].get("demo_groups_max_images", 10)),
                        "--omit-colour",
                        str(params["data"].get("demo_omit_colour", 0.4)),
                        "--patterns",
                        str(params["data"].get("demo_patterns", "one")),
                    ],
                    check=True,
                )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp-outputs"))
    pipeline = build_pipeline(params, launcher="torchrun", shards=1)  # kfp.local does not run dsl.ParallelFor
    run = pipeline(
        sources=sources,
        base_models=str(base),
        pod_gpus=nproc,
        evaluate_gpus=0,
        register_lock_dir=str(params["register"].get("lock_dir") or ""),  # no shared volume: this host's lock
        mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{REPO_ROOT / 'mlflow.db'}"),
    )
    return {"outputs": str(workdir / "kfp-outputs"), "run": run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipelines/full.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="parameters file (default: params.yaml)")
    # --params is accepted before or after the command (`full.py compile --params FILE` works too)
    params_after = argparse.ArgumentParser(add_help=False)
    params_after.add_argument("--params", default=argparse.SUPPRESS, help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compile", help="write the pipeline package (IR YAML)", parents=[params_after])
    p.add_argument("--out", default="full.yaml", help="package file (default full.yaml)")
    p.add_argument("--image", help="component image (default: $EASYREF_IMAGE or easyref:0.1.0)")
    p.add_argument("--launcher", choices=LAUNCHERS, help="training launcher (default: cluster.launcher)")
    p.add_argument("--shards", type=int, help="ingest tasks in parallel, then a merge (default: ingest.shards)")
    p = sub.add_parser("submit", help="compile and submit a run through kfp.Client", parents=[params_after])
    p.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--experiment", default="easyref", help="experiment name (default easyref)")
    p.add_argument("--run-name", help="run name (default: easyref-full <timestamp>)")
    p.add_argument("--image", help="component image (default: $EASYREF_IMAGE or easyref:0.1.0)")
    p.add_argument("--launcher", choices=LAUNCHERS, help="training launcher (default: cluster.launcher)")
    p.add_argument("--shards", type=int, help="ingest tasks in parallel, then a merge (default: ingest.shards)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter (YAML value), repeatable, e.g. --param nodes=2",
    )
    p = sub.add_parser(
        "local", help="run the whole pipeline in kfp.local on this machine (tiny profile)", parents=[params_after]
    )
    p.add_argument("--workdir", default="outputs/kfp-local", help="where task outputs go (default outputs/kfp-local)")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes per training step (default 2)")
    args = parser.parse_args(argv)

    if args.command == "compile":
        out = compile_package(args.out, args.params, args.image, args.launcher, args.shards)
        print(f"wrote {out}; submit with: kfp --endpoint URL run create --experiment-name easyref --package-file {out}")
    elif args.command == "submit":
        import tempfile

        import kfp

        with tempfile.TemporaryDirectory() as tmp:
            package = compile_package(Path(tmp) / "full.yaml", args.params, args.image, args.launcher, args.shards)
            client = kfp.Client(host=args.host, namespace=args.namespace)
            run = client.create_run_from_pipeline_package(
                str(package),
                arguments=parse_param(args.param),
                run_name=args.run_name,
                experiment_name=args.experiment,
                namespace=args.namespace,
            )
        print(f"submitted run {run.run_id}: {args.host.rstrip('/')}/#/runs/details/{run.run_id}")
    else:
        result = run_local(args.params, Path(args.workdir), args.nproc)
        print(f"local run finished; task outputs under {result['outputs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
