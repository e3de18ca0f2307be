"""The training loop of one EasyRef stage, for one process or many (DDP or FSDP2)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from easyref.config import flatten, to_dict
from easyref.errors import UserError
from easyref.model import EasyRef, load_model
from easyref.sampler import EasyRefSampler, base_paths
from easyref.train import checkpoint as ckpt
from easyref.train import distributed as D
from easyref.train import resume
from easyref.train.config import TrainConfig
from easyref.train.data import EpochIndexed, GlobalOrderSampler, build_dataset, collate
from easyref.train.integrity import STATE_FILE, pick_checkpoint
from easyref.train.recipe import Conditioner, DiffusionObjective, step_generator
from easyref.train.tracking import MlflowTracker, NullTracker, git_commit, preview_grid, record_caption_cuts


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing was saved from the poisoned step."""


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    final: Path
    """The stage's output checkpoint (``OUT/final``)."""
    step: int
    """Optimizer steps completed."""
    start_step: int
    """The step training (re)started from."""
    losses: list[float] = field(default_factory=list)
    """Mean loss over all ranks of each step run by this call."""
    run_id: str | None = None
    """MLflow run id (rank 0)."""


def build_model(config: TrainConfig, init: Path | None, sdxl: Path, mllm: Path) -> EasyRef:
    """Base models + the init checkpoint's trained parts (or fresh, seeded ones), LoRA added if the stage trains it."""
    torch.manual_seed(config.seed)
    model = load_model(sdxl, mllm, checkpoint=init, config=config.model)
    if "lora" in config.parts and not model.config.lora_rank:
        model.add_lora(config.lora_rank)
    return model


def enable_gradient_checkpointing(model: EasyRef) -> None:
    """Recompute UNet blocks and the (trainable) MLLM decoder layers in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.unet.enable_gradient_checkpointing()
    fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for module in model.reference_encoder.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = fn


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _infinite(loader: DataLoader):
    yield from loader
    raise UserError("the data loader ran out of samples before max_steps (this is a bug in the sampler)")


class Previewer:
    """Samples a few fixed reference groups with the library's DDIM sampler and logs one grid per call."""

    def __init__(self, sampler: EasyRefSampler, dataset: Dataset, config: TrainConfig):
        count = min(config.preview_samples, len(dataset))
        items = [dataset[i] for i in range(count)]
        self.refs = [list(s["references"]) for s in items]
        self.captions = [str(s["caption"]) for s in items]
        self.sampler, self.config = sampler, config
        self.size = int(items[0]["target"].shape[-1]) if items else None

    def __call__(self, tracker: NullTracker, step: int, dtype: torch.dtype | None) -> None:
        if not self.refs:
            return
        with _autocast(self.sampler.device, dtype):
            images = self.sampler(
                self.captions,
                self.refs,
                num_inference_steps=self.config.preview_steps,
                generator=self.config.seed,
                height=self.size,
                width=self.size,
                progress=False,
            )
        grid = preview_grid(list(zip(self.refs, images, strict=True)))
        tracker.log_image(grid, f"previews/step_{step:08d}.png")


def train(
    config: TrainConfig,
    out: str | Path,
    init: str | Path | None = None,
    dataset: Dataset | None = None,
    preview_dataset: Dataset | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Run (or resume) one stage; returns when ``config.max_steps`` optimizer steps are done.

    ``dataset`` overrides ``config.data`` (tests, notebooks). Holds ``out``'s lock for the whole run. Resumes
    automatically from the newest intact checkpoint in ``out/checkpoints`` when its settings are this run's (or
    ``allow_config_change``). The process group is set up from the torchrun environment and torn down at the end.
    """
    env = D.setup()
    try:
        out = Path(out)
        with resume.output_guard(out, env):
            return _train(config, out, Path(init) if init else None, dataset, preview_dataset, env, allow_config_change)
    finally:
        D.teardown()


def _resume_point(out: Path, settings: dict, allow: bool, env: D.DistEnv) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (rank 0 verifies and picks it) and the settings that changed since."""

    def pick() -> str | None:  # verifies checksums and sets damaged checkpoints aside: one process does it
        path = pick_checkpoint(ckpt.step_folders(out))
        return str(path) if path else None

    picked = D.on_main(pick, env)
    if picked is None:
        return None, []
    latest = Path(picked)
    record = json.loads((latest / STATE_FILE).read_text())
    return latest, resume.check_resume(latest, record, settings, allow)


def _train(
    config: TrainConfig,
    out: Path,
    init: Path | None,
    dataset: Dataset | None,
    preview_dataset: Dataset | None,
    env: D.DistEnv,
    allow_config_change: bool,
) -> TrainResult:
    sdxl, mllm = base_paths(config.base)
    settings = resume.run_settings(config, init, env.world_size)
    latest, changes = _resume_point(out, settings, allow_config_change, env)
    if init is None and config.stage != "pretrain" and env.is_main:
        print(f"warning: stage {config.stage} without --init starts from untrained EasyRef parts")
    model = build_model(config, init, sdxl, mllm)
    sampler = EasyRefSampler.from_model(model, sdxl, mllm, device=env.device)
    resolution = config.resolution or model.unet.config.sample_size * sampler.pipe.vae_scale_factor
    data_kw = dict(
        stage=config.stage,
        resolution=resolution,
        max_references=model.config.max_references,
        image_root=config.image_root,
        seed=config.seed,
    )
    if dataset is None:
        dataset = build_dataset(config.data, **data_kw)
    if preview_dataset is None and config.preview_data:
        preview_dataset = build_dataset(config.preview_data, **data_kw)
    if config.stage == "multi_ref" and config.batch_size > 1 and len(getattr(dataset, "buckets", [None])) > 1:
        raise UserError(
            "multi_ref trains on aspect-ratio buckets: use batch_size 1 per device and grad_accum for "
            "a larger global batch (bucket-aware global order is not implemented yet)"
        )

    conditioner = Conditioner.from_pipeline(
        sampler.pipe, sampler.processor, sdxl, env.device, (config.drop_text, config.drop_image, config.drop_both)
    )
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.set_trainable(config.parts)
    model.train()
    dtype = autocast_dtype(config, env.device)
    objective: torch.nn.Module = DiffusionObjective(model)
    if config.fsdp and env.distributed:
        D.shard_fsdp(model, env, param_dtype=dtype)
    else:
        objective = D.wrap_ddp(objective, env)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)

    start, run_id = 0, None
    if latest is not None:
        record = ckpt.load_training_state(latest, model, optimizer, env)
        resume.apply_hyperparameters(optimizer, config)  # the checkpoint's optimizer state brings its own lr
        start, run_id = int(record["step"]), record.get("mlflow_run_id")
        if env.is_main:
            print(f"resuming from {latest} (step {start})")
            if changes:
                print(
                    f"warning: --allow-config-change: resuming with changed settings, applied from step "
                    f"{start + 1}: {'; '.join(changes)}",
                    file=sys.stderr,
                )

    global_batch = config.global_batch(env.world_size)
    tracker: NullTracker = NullTracker()
    if env.is_main:
        params_log = flatten(to_dict(config)) | {
            "world_size": env.world_size,
            "global_batch": global_batch,
            "init": str(init) if init else "",
            "resolution": resolution,
        }
        tags = {
            "git_commit": git_commit(),
            "stage": config.stage,
            "world_size": str(env.world_size),
            "data_manifest_hash": settings["data"],
            "global_batch": str(global_batch),
            "settings_hash": resume.settings_hash(settings),
        }
        if changes:
            tags[f"config_change_at_step_{start}"] = "; ".join(changes)[:5000]
        tracker = MlflowTracker(config.experiment, config.stage, params_log, tags, run_id=run_id)
    run_id = D.broadcast_object(tracker.run_id, env)
    previewer = Previewer(sampler, preview_dataset or dataset, config) if config.preview_every >= 0 else None
    preview_here = previewer is not None and (env.is_main or (config.fsdp and env.distributed))

    order = GlobalOrderSampler(
        len(dataset),
        seed=config.seed,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        rank=env.rank,
        world_size=env.world_size,
        start_step=start,
        max_steps=config.max_steps,
    )
    loader = DataLoader(
        EpochIndexed(dataset),
        batch_size=config.batch_size,
        sampler=order,
        collate_fn=collate,
        num_workers=config.num_workers,
        drop_last=False,
    )
    batches = _infinite(loader)
    result = TrainResult(final=out / "final", step=start, start_step=start, run_id=run_id)
    is_ddp = isinstance(objective, torch.nn.parallel.DistributedDataParallel)
    if env.is_main:
        print(
            f"stage {config.stage}: steps {start}->{config.max_steps}, world size {env.world_size}, "
            f"global batch {global_batch}, lr {config.lr}, trainable {sum(p.numel() for p in params):,} params"
        )
    bar = tqdm(total=config.max_steps, initial=start, desc=config.stage, disable=not env.is_main, dynamic_ncols=True)
    status = "FAILED"
    try:
        for step in range(start, config.max_steps):
            t0 = time.perf_counter()
            micro_losses = []
            for micro in range(config.grad_accum):
                batch = next(batches)
                with _autocast(env.device, dtype):
                    cond = conditioner(batch, step_generator(config.seed, step, micro, env.rank))
                last = micro == config.grad_accum - 1
                sync = objective.no_sync() if is_ddp and not last else contextlib.nullcontext()
                with sync:
                    with _autocast(env.device, dtype):
                        loss = objective(cond)
                    (loss / config.grad_accum).backward()
                micro_losses.append(loss.detach().float())
            step_loss = float(D.all_reduce_mean(torch.stack(micro_losses).mean(), env))
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                last_ckpt = ckpt.latest_checkpoint(out)
                raise TrainingDiverged(
                    f"loss is {step_loss} at step {step + 1}; stopped without taking the step or saving. "
                    f"Last good checkpoint: {last_ckpt or 'none'}. Check the data (NaN pixels?), lower lr "
                    f"({config.lr}) or use mixed_precision: no"
                )
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t0
            result.losses.append(step_loss)
            result.step = done
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if done % config.log_every == 0 or done == config.max_steps:
                metrics = {
                    "loss": step_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "step_time_s": dt,
                    "samples_per_s": global_batch / dt,
                    "epoch": done * global_batch / len(dataset),
                }
                if env.device.type == "cuda":
                    metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                tracker.log_metrics(metrics, step=done)
            if config.save_every and (done % config.save_every == 0 or done == config.max_steps):
                state = {
                    "data": order.state(done),
                    "mlflow_run_id": run_id,
                    "loss": step_loss,
                    "stage": config.stage,
                    "settings": settings,
                    "settings_hash": resume.settings_hash(settings),
                    "data_fingerprint": settings["data"],
                }
                ckpt.save_training_state(out, done, model, optimizer, env, state, config.keep_last)
            preview_now = config.preview_every > 0 and done % config.preview_every == 0
            if preview_here and (preview_now or (done == config.max_steps and config.preview_every == 0)):
                previewer(tracker, done, dtype)
        bar.close()
        record_caption_cuts(tracker, conditioner.captions, env, result.step)
        tensors = ckpt.trainable_state(model) if config.fsdp and env.distributed else None
        if env.is_main:
            extra = {
                "stage": config.stage,
                "step": result.step,
                "base": {"sdxl": str(sdxl), "mllm": str(mllm)},
                "data_hash": settings["data"],
                "git_commit": git_commit(),
                "mlflow_run_id": run_id or "",
            }
            ckpt.save_final(model, tensors, result.final, list(config.parts), **extra)
            print(f"wrote {result.final}")
        D.barrier(env)
        status = "FINISHED"
        return result
    finally:
        bar.close()
        tracker.finish(status)
