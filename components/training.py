"""What the pretrain and finetune components run: one training stage, locally with torchrun or as a TrainJob.

``launcher="torchrun"`` trains inside the component's own process tree: ``torchrun --standalone`` with
``nproc`` processes (the GPUs of the pod, or CPU processes on a laptop). ``launcher="trainjob"`` stages the
inputs on the shared volume, creates a Kubeflow Trainer ``TrainJob`` with ``easyref launch --submit`` (nodes x GPUs),
waits for it, raises with the job's failure message if it fails, and copies the stage's ``final/`` checkpoint
back into the component's output artifact.

The component functions import this module inside their bodies; it is on ``PYTHONPATH`` in the image
(``infra/Dockerfile``) and, locally, from the repository root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.params import write_section
from easyref.runs import PIPELINE_RUN_ENV

TRAINER_GROUP, TRAINER_VERSION, TRAINER_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"


@dataclass(kw_only=True)
class StageRequest:
    """One training stage as the components describe it."""

    stage: str
    """``pretrain``, ``single_ref`` or ``multi_ref``."""
    split_dir: str
    """The split artifact's folder (``train.parquet``, ``held_in.parquet``, ``split.json``)."""
    ingested_dir: str
    """The ingest artifact's folder (``manifest.parquet``, ``images/``); the split's image paths are relative to it."""
    base_models: str
    """Folder with the base models ``sdxl/`` and ``mllm/``, visible to the training processes."""
    train_config: dict[str, Any]
    """The ``train:`` section of params.yaml (shared keys and per-stage sub-mappings)."""
    out_dir: str
    """Where the stage's ``final`` checkpoint is copied (the component's ``Model`` artifact)."""
    init_dir: str = ""
    """The previous stage's checkpoint (empty for pretraining)."""
    data: str = ""
    """Packed training shards to train from (``s3://`` prefix written by the pack component); empty = the split's
    ``train.parquet`` and the ingested image files."""
    max_steps: int = 0
    """Optimizer steps (0 = the params' value)."""
    launcher: str = "torchrun"
    """``torchrun`` (in this pod / on this machine) or ``trainjob`` (Kubeflow Trainer)."""
    nproc: int = 2
    """Processes of the local torchrun."""
    nodes: int = 1
    """TrainJob nodes."""
    gpus_per_node: int = 8
    """TrainJob GPUs (and processes) per node."""
    node_cpu: str = ""
    """TrainJob CPU per node, request = limit (params.yaml ``cluster.node_resources``; empty = unset)."""
    node_memory: str = ""
    """TrainJob memory per node, request = limit (empty = unset)."""
    image: str = ""
    """TrainJob image."""
    namespace: str = "easyref"
    """TrainJob namespace."""
    pvc: str = ""
    """Shared PersistentVolumeClaim mounted by the TrainJob."""
    mount_path: str = "/mnt/easyref"
    """Where ``pvc`` is mounted, in the TrainJob and in this pod."""
    run_id: str = "local"
    """Pipeline run id: names the staging folder and the TrainJob, and (unless ``local``) the pipeline execution
    whose MLflow run the stage's run nests under (``EASYREF_PIPELINE_RUN``)."""
    secret_env: list[str] = field(default_factory=list)
    """``NAME=SECRET:KEY`` environment of the TrainJob."""
    timeout_s: float = 7 * 24 * 3600
    """How long to wait for the TrainJob."""
    poll_s: float = 30.0
    """Seconds between TrainJob status reads."""


def _log(message: str) -> None:
    print(f"[easyref {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _train_flags(req: StageRequest, params_file: Path, split_dir: Path, image_root: Path, run_dir: Path,
                 init: Path | None) -> list[str]:
    flags = ["train", "--stage", req.stage, "--params", str(params_file), "--out", str(run_dir),
             "--base", req.base_models, "--data", req.data or str(split_dir / "train.parquet"),
             "--image-root", str(image_root)]
    if (split_dir / "held_in.parquet").is_file():
        flags += ["--preview-data", str(split_dir / "held_in.parquet")]
    if init is not None:
        flags += ["--init", str(init)]
    if req.max_steps > 0:
        flags += ["--max-steps", str(req.max_steps)]
    return flags


def write_params(path: Path, train_config: dict[str, Any]) -> Path:
    """``path.parent/params.yaml`` with only the ``train:`` section: the file the training processes read."""
    return Path(write_section(path.parent, "train", train_config))


def run_stage(req: StageRequest) -> dict[str, Any]:
    """Train the stage and copy ``final/`` to ``req.out_dir``; returns facts for the artifact's metadata."""
    if req.launcher not in ("torchrun", "trainjob"):
        raise ValueError(f"launcher must be 'torchrun' or 'trainjob', got {req.launcher!r}")
    final = run_torchrun(req) if req.launcher == "torchrun" else run_trainjob(req)
    out = Path(req.out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(final, out)
    record = json.loads((out / "easyref_config.json").read_text()) if (out / "easyref_config.json").is_file() else {}
    extra = record.get("extra") or {}
    return {"stage": req.stage, "step": extra.get("step"), "mlflow_run_id": extra.get("mlflow_run_id", ""),
            "parts": record.get("parts", []), "launcher": req.launcher}


def tracking_env(req: StageRequest) -> dict[str, str]:
    """What the training processes need for MLflow: the tracking URI, and the pipeline execution (unless the run id
    is ``local``) whose MLflow run the stage's run nests under (``EASYREF_PIPELINE_RUN``, easyref.runs)."""
    env = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]} if os.environ.get("MLFLOW_TRACKING_URI") else {}
    if req.run_id and req.run_id != "local":
        env[PIPELINE_RUN_ENV] = req.run_id
    return env


# -- local: torchrun ---------------------------------------------------------------------------------------------------


def run_torchrun(req: StageRequest) -> Path:
    """``torchrun --standalone --nproc_per_node N -m easyref.cli train ...`` in a run folder beside the artifact."""
    run_dir = Path(req.out_dir + ".run")
    params = write_params(run_dir / "params.yaml", req.train_config)
    flags = _train_flags(req, params, Path(req.split_dir), Path(req.ingested_dir), run_dir,
                         Path(req.init_dir) if req.init_dir else None)
    if req.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(req.nproc),
               "-m", "easyref.cli", *flags]
    else:
        cmd = [sys.executable, "-m", "easyref.cli", *flags]
    _log("running " + " ".join(cmd))
    result = subprocess.run(cmd, check=False, env={**os.environ, **tracking_env(req)})
    if result.returncode != 0:
        raise RuntimeError(f"easyref train --stage {req.stage} failed with exit status {result.returncode} "
                           f"(see the log above); its run folder {run_dir} keeps checkpoints for a resume")
    return run_dir / "final"


# -- cluster: Kubeflow Trainer TrainJob ----------------------------------------------------------------------------------


def job_name(stage: str, run_id: str) -> str:
    """``easyref-<stage>-<run id>``, cut to a valid RFC 1035 label."""
    suffix = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:24].strip("-")
    return f"easyref-{stage.replace('_', '-')}-{suffix}".strip("-")[:63].rstrip("-")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` once: a ``.complete`` marker makes a retried task skip finished copies."""
    marker = dst / ".complete"
    if marker.is_file():
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    marker.touch()


def stage_inputs(req: StageRequest) -> tuple[Path, Path, Path | None]:
    """Copy the split, the ingested data and the init checkpoint to the shared volume; returns their new places.

    The staged ``split.json`` names the staged manifest, so that tools reading it find the staged images.
    """
    if not req.mount_path or not Path(req.mount_path).is_dir():
        raise RuntimeError(f"the shared volume is not mounted at {req.mount_path!r}; the trainjob launcher needs the "
                           f"pipeline's PVC mounted in this task and in the TrainJob")
    root = Path(req.mount_path) / "pipeline-runs" / req.run_id
    ingested, split = root / "ingested", root / "split"
    _copy_tree(Path(req.ingested_dir), ingested)
    if not (split / ".complete").is_file():
        _copy_tree(Path(req.split_dir), split)
        info_file = split / "split.json"
        if info_file.is_file():
            info = json.loads(info_file.read_text())
            info["manifest"] = str(ingested / "manifest.parquet")
            info_file.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    init = None
    if req.init_dir:
        init = root / req.stage / "init"
        _copy_tree(Path(req.init_dir), init)
    return split, root / req.stage, init


def _kube_api() -> Any:
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def read_trainjob(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.rest import ApiException

    try:
        return api.get_namespaced_custom_object(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINER_PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def trainjob_state(job: dict[str, Any]) -> tuple[str, str]:
    """(``Complete`` | ``Failed`` | ``Running``, message) from a TrainJob's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "Running", ""


def wait_for_trainjob(api: Any, namespace: str, name: str, timeout_s: float, poll_s: float) -> None:
    """Block until the TrainJob completes; raise with its failure message if it fails or the wait times out."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        job = read_trainjob(api, namespace, name)
        if job is None:
            raise RuntimeError(f"TrainJob {namespace}/{name} disappeared while waiting for it")
        state, message = trainjob_state(job)
        if state != last:
            _log(f"TrainJob {namespace}/{name}: {state} {message}".rstrip())
            last = state
        if state == "Complete":
            return
        if state == "Failed":
            raise RuntimeError(f"TrainJob {namespace}/{name} failed: {message}. Logs: kubectl logs -n {namespace} "
                               f"-l jobset.sigs.k8s.io/jobset-name={name} --all-containers --prefix")
        if time.monotonic() > deadline:
            raise RuntimeError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s; it is still "
                               f"running (delete it with: kubectl delete trainjob -n {namespace} {name})")
        time.sleep(poll_s)


def launch_command(req: StageRequest, name: str, params: Path, split: Path, run_dir: Path,
                   init: Path | None) -> list[str]:
    """``easyref launch --submit ...`` for this stage (the TrainJob runs torchrun on every node)."""
    cmd = [sys.executable, "-m", "easyref.cli", "launch", "--submit", "--stage", req.stage, "--name", name,
           "--namespace", req.namespace, "--image", req.image, "--nodes", str(req.nodes),
           "--gpus-per-node", str(req.gpus_per_node), "--pvc", req.pvc, "--mount-path", req.mount_path,
           "--out", str(run_dir / "run"), "--params", str(params), "--label", "app.kubernetes.io/part-of=easyref"]
    if req.node_cpu:
        cmd += ["--cpu", req.node_cpu]
    if req.node_memory:
        cmd += ["--memory", req.node_memory]
    if init is not None:
        cmd += ["--init", str(init)]
    for name, value in tracking_env(req).items():
        cmd += ["--env", f"{name}={value}"]
    for pair in req.secret_env:
        cmd += ["--secret-env", pair]
    flags = _train_flags(req, params, split, split.parent / "ingested", run_dir / "run", None)
    # launch already sets --stage/--params/--out/--init; pass the rest after "--"
    extra = flags[flags.index("--base"):]
    return [*cmd, "--", *extra]


def run_trainjob(req: StageRequest) -> Path:
    if not req.image or not req.pvc:
        raise ValueError("the trainjob launcher needs the image and the shared PVC (pipeline parameters)")
    split, stage_dir, init = stage_inputs(req)
    params = write_params(stage_dir / "params.yaml", req.train_config)
    name = job_name(req.stage, req.run_id)
    api = _kube_api()
    if read_trainjob(api, req.namespace, name) is None:
        cmd = launch_command(req, name, params, split, stage_dir, init)
        _log("running " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    else:
        _log(f"TrainJob {req.namespace}/{name} exists (a retried task): waiting for it")
    wait_for_trainjob(api, req.namespace, name, req.timeout_s, req.poll_s)
    final = stage_dir / "run" / "final"
    if not (final / "easyref_config.json").is_file():
        raise RuntimeError(f"TrainJob {name} completed but wrote no checkpoint at {final}")
    return final


def tracked_metrics(info: dict[str, Any]) -> dict[str, float]:
    """The stage's step count and the last values of its MLflow metrics (loss, throughput), best effort."""
    out: dict[str, float] = {}
    if info.get("step") is not None:
        out["steps"] = float(info["step"])
    run_id = info.get("mlflow_run_id")
    if not run_id:
        return out
    try:
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
        run = mlflow.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - the checkpoint is what matters; metrics are a convenience
        _log(f"could not read MLflow run {run_id}: {exc}")
        return out
    for key in ("loss", "samples_per_s", "step_time_s"):
        if key in run.data.metrics:
            out[key] = float(run.data.metrics[key])
    return out
