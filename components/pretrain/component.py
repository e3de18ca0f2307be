"""KFP component: stage 1, alignment pretraining (``easyref train --stage pretrain``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pretrain(
    split: Input[Dataset],
    ingested: Input[Dataset],
    base_models: str,
    checkpoint: Output[Model],
    metrics: Output[Metrics],
    config: dict = {},  # noqa: B006 - KFP parameter defaults are JSON values
    max_steps: int = 0,
    launcher: str = "torchrun",
    nproc: int = 2,
    nodes: int = 1,
    gpus_per_node: int = 8,
    node_resources: dict = {},  # noqa: B006
    image: str = "",
    namespace: str = "easyref",
    pvc: str = "",
    mount_path: str = "/mnt/easyref",
    secret_env: list = [],  # noqa: B006
    run_id: str = "local",
    mlflow_tracking_uri: str = "",
    data: str = "",
):
    """Train the final MLLM layer, reference tokens, projector and IP key/value projections on ``train.parquet``.

    Args:
        split: The split component's folder (``train.parquet``; ``held_in.parquet`` drives the preview grids).
        ingested: The ingest component's folder (the images the split's paths point to).
        base_models: Folder with ``sdxl/`` and ``mllm/`` (on the shared volume on a cluster).
        config: The ``train:`` section of params.yaml (shared keys and per-stage sub-mappings).
        max_steps: Optimizer steps (0 = ``train.pretrain.max_steps``).
        launcher: ``torchrun`` (this pod / machine, ``nproc`` processes) or ``trainjob`` (Kubeflow Trainer).
        nproc: Processes of the local torchrun (GPUs of this pod; 2 CPU processes locally).
        nodes: TrainJob nodes.
        gpus_per_node: TrainJob GPUs (and processes) per node.
        node_resources: TrainJob CPU and memory per node (``{cpu, memory}``, request = limit; empty = unset).
        image: TrainJob container image (the project image).
        namespace: TrainJob namespace.
        pvc: Shared PersistentVolumeClaim of this task and the TrainJob.
        mount_path: Where ``pvc`` is mounted.
        secret_env: ``NAME=SECRET:KEY`` environment variables of the TrainJob (MLflow, S3 credentials).
        run_id: Pipeline run id (names the TrainJob and its staging folder).
        mlflow_tracking_uri: MLflow server (empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        data: Packed training shards (``s3://`` prefix of the pack task) to train from; empty = the split's
            files.
        checkpoint: The stage's ``final`` checkpoint (``easyref.safetensors`` + ``easyref_config.json``).
        metrics: Steps and the last logged loss.
    """
    import os

    from components.training import StageRequest, run_stage, tracked_metrics

    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    info = run_stage(StageRequest(
        stage="pretrain", split_dir=split.path, ingested_dir=ingested.path, base_models=base_models,
        train_config=config, out_dir=checkpoint.path, max_steps=max_steps, launcher=launcher, nproc=nproc,
        nodes=nodes, gpus_per_node=gpus_per_node, node_cpu=str(node_resources.get("cpu", "")),
        node_memory=str(node_resources.get("memory", "")), image=image, namespace=namespace, pvc=pvc,
        mount_path=mount_path, secret_env=list(secret_env), run_id=run_id, data=data,
    ))
    checkpoint.metadata.update(info)
    for key, value in tracked_metrics(info).items():
        metrics.log_metric(key, value)
