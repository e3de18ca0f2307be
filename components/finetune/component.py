"""KFP component: stages 2 and 3, single- and multi-reference finetuning (``easyref train --stage ...``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.settings import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def finetune(
    stage: str,
    init: Input[Model],
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
    """Finetune from the previous stage's checkpoint: the whole MLLM, the adapter and a UNet LoRA.

    Args:
        stage: ``single_ref`` (one reference per sample) or ``multi_ref`` (shuffled, randomly truncated groups).
        init: The previous stage's checkpoint.
        split: The split component's folder.
        ingested: The ingest component's folder.
        base_models: Folder with ``sdxl/`` and ``mllm/``.
        config: The ``train:`` section of params.yaml.
        max_steps: Optimizer steps (0 = ``train.<stage>.max_steps``).
        launcher: ``torchrun`` or ``trainjob`` (see the pretrain component).
        nproc: Processes of the local torchrun.
        nodes: TrainJob nodes.
        gpus_per_node: TrainJob GPUs per node.
        node_resources: TrainJob CPU and memory per node (``{cpu, memory}``, request = limit; empty = unset).
        image: TrainJob container image.
        namespace: TrainJob namespace.
        pvc: Shared PersistentVolumeClaim.
        mount_path: Where ``pvc`` is mounted.
        secret_env: ``NAME=SECRET:KEY`` environment variables of the TrainJob.
        run_id: Pipeline run id.
        mlflow_tracking_uri: MLflow server (empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        data: Packed training shards (``s3://`` prefix of the pack task) to train from; empty = the split's
            files.
        checkpoint: The stage's ``final`` checkpoint.
        metrics: Steps and the last logged loss.
    """
    import os

    from components.training import StageRequest, run_stage, tracked_metrics

    if stage not in ("single_ref", "multi_ref"):
        raise ValueError(f"finetune: stage must be single_ref or multi_ref, got {stage!r}")
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    info = run_stage(StageRequest(
        stage=stage, split_dir=split.path, ingested_dir=ingested.path, base_models=base_models,
        train_config=config, out_dir=checkpoint.path, init_dir=init.path, max_steps=max_steps, launcher=launcher,
        nproc=nproc, nodes=nodes, gpus_per_node=gpus_per_node, node_cpu=str(node_resources.get("cpu", "")),
        node_memory=str(node_resources.get("memory", "")), image=image, namespace=namespace, pvc=pvc,
        mount_path=mount_path, secret_env=list(secret_env), run_id=run_id, data=data,
    ))
    checkpoint.metadata.update(info)
    for key, value in tracked_metrics(info).items():
        metrics.log_metric(key, value)
