"""The training loop of one EasyRef stage, for one process or many (DDP or FSDP2): :func:`train` runs a
:class:`Trainer`, whose steps (build, resume, track, train_step, save, preview, save_final) are named methods."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from easyref.base_models import BaseModels
from easyref.config import flatten, to_dict
from easyref.errors import UserError
from easyref.sampler import EasyRefSampler, base_paths
from easyref.train import checkpoint as ckpt
from easyref.train import distributed as D
from easyref.train import resume
from easyref.train.build import build_model, compile_unet, enable_gradient_checkpointing
from easyref.train.cache import ConditioningCache, record_cache_counts
from easyref.train.config import TrainConfig
from easyref.train.data import EpochIndexed, GlobalOrderSampler, build_dataset
from easyref.train.recipe import (
    Conditioner,
    DiffusionObjective,
    autocast_context,
    autocast_dtype,
    step_generator,
)
from easyref.train.tracking import MlflowTracker, NullTracker, Previewer, git_commit, record_caption_cuts


class TrainingDiverged(UserError):
    """The loss, or the weights after an update, became NaN or infinite; nothing was saved from the poisoned step."""


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


def _infinite(loader: DataLoader):
    yield from loader
    raise UserError("the data loader ran out of samples before max_steps (this is a bug in the sampler)")


def train(
    config: TrainConfig,
    out: str | Path,
    init: str | Path | None = None,
    dataset: Dataset | None = None,
    preview_dataset: Dataset | None = None,
    allow_config_change: bool = False,
    restart_on_config_change: bool = False,
) -> TrainResult:
    """Run (or resume) one stage; returns when ``config.max_steps`` optimizer steps are done.

    ``dataset`` overrides ``config.data`` (tests, notebooks). Holds ``out``'s lock for the whole run. Resumes
    automatically from the newest intact checkpoint in ``out/checkpoints`` when its settings are this run's (or
    ``allow_config_change``; with ``restart_on_config_change`` a checkpoint of other settings is set aside and the
    run starts at step 0). The process group is set up from the torchrun environment and torn down at the end.
    """
    env = D.setup()
    try:
        out = Path(out)
        with resume.output_guard(out, env):
            trainer = Trainer(
                config,
                out,
                Path(init) if init else None,
                env,
                dataset=dataset,
                preview_dataset=preview_dataset,
                allow_config_change=allow_config_change,
                restart_on_config_change=restart_on_config_change,
            )
            try:
                return trainer.run()
            finally:  # its DDP wrapper holds the process group, which teardown must be the one to end
                del trainer
                gc.collect()  # the trainer's reference cycles too
    finally:
        D.teardown()


class Trainer:
    """One stage's run as named steps, each on a screen; :meth:`run` strings them together.

    Construction checks the resume point (a changed setting is refused before anything loads); :meth:`build` loads
    the base models once and builds the model, data, conditioning and optimizer; :meth:`resume` restores the newest
    intact checkpoint; :meth:`start_tracking` opens the MLflow run and the previewer; then every step is
    :meth:`train_step`, :meth:`track`, :meth:`save` and :meth:`preview`, and :meth:`save_final` writes the output.
    """

    def __init__(
        self,
        config: TrainConfig,
        out: Path,
        init: Path | None,
        env: D.DistEnv,
        *,
        dataset: Dataset | None = None,
        preview_dataset: Dataset | None = None,
        allow_config_change: bool = False,
        restart_on_config_change: bool = False,
    ):
        self.config, self.out, self.init, self.env = config, out, init, env
        self.dataset, self.preview_dataset = dataset, preview_dataset
        self.sdxl, self.mllm = base_paths(config.base)
        self.settings = resume.run_settings(config, init, env.world_size, (self.sdxl, self.mllm))
        self.latest, self.changes = resume.resume_point(
            out, self.settings, allow_config_change, env, restart=restart_on_config_change
        )
        self.dtype = autocast_dtype(config, env.device)
        self.global_batch = config.global_batch(env.world_size)
        self.start, self.run_id = 0, None
        self.tracker: NullTracker = NullTracker()
        self.previewer: Previewer | None = None

    # -- build --------------------------------------------------------------------------------------------------------

    def build(self) -> None:
        """The model (base + ``--init`` + LoRA), the shared base models, the data, the conditioning, the optimizer."""
        config, env = self.config, self.env
        if self.init is None and config.stage != "pretrain" and env.is_main:
            print(f"warning: stage {config.stage} without --init starts from untrained EasyRef parts")
        self.model = build_model(config, self.init, self.sdxl, self.mllm).to(env.device)
        self.base = BaseModels.load(self.sdxl, self.mllm, self.model.config, device=env.device)
        self.build_data()
        self.cache = ConditioningCache.open(config.cache_dir, self.base) if config.cache_dir else None
        self.conditioner = Conditioner(
            self.base, (config.drop_text, config.drop_image, config.drop_both), cache=self.cache,
            noise_offset=config.noise_offset,
        )
        self.build_optimizer()

    def build_data(self) -> None:
        """The training (and preview) dataset at the stage's resolution (``0``: the UNet's native size)."""
        config, model = self.config, self.model
        self.resolution = config.resolution or model.unet.config.sample_size * self.base.vae_scale_factor
        data_kw = dict(
            stage=config.stage,
            resolution=self.resolution,
            max_references=model.config.max_references,
            image_root=config.image_root,
            seed=config.seed,
        )
        if self.dataset is None:
            self.dataset = build_dataset(config.data, **data_kw)
        if self.preview_dataset is None and config.preview_data:
            self.preview_dataset = build_dataset(config.preview_data, **data_kw)
        if config.stage == "multi_ref" and config.batch_size > 1 and len(getattr(self.dataset, "buckets", [None])) > 1:
            raise UserError(
                "multi_ref trains on aspect-ratio buckets: use batch_size 1 per device and grad_accum for "
                "a larger global batch (bucket-aware global order is not implemented yet)"
            )

    def build_optimizer(self) -> None:
        """Trainable parts, gradient checkpointing, DDP or FSDP2 wrapping, AdamW over the trainable parameters."""
        config, env, model = self.config, self.env, self.model
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.set_trainable(config.parts)
        model.train()
        if config.compile_unet:
            compile_unet(model, env.device, config.compile_backend)
        self.objective: torch.nn.Module = DiffusionObjective(model)
        if config.fsdp and env.distributed:
            D.shard_fsdp(model, env, param_dtype=self.dtype)
        else:
            self.objective = D.wrap_ddp(self.objective, env)
        self.is_ddp = isinstance(self.objective, torch.nn.parallel.DistributedDataParallel)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )

    # -- resume and tracking ------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest intact checkpoint: weights, optimizer, RNG states, step and MLflow run."""
        if self.latest is None:
            return
        record = ckpt.load_training_state(self.latest, self.model, self.optimizer, self.env)
        resume.apply_hyperparameters(self.optimizer, self.config)  # the checkpoint's optimizer state brings its own lr
        self.start, self.run_id = int(record["step"]), record.get("mlflow_run_id")
        if self.env.is_main:
            print(f"resuming from {self.latest} (step {self.start})")
            if self.changes:
                print(
                    f"warning: --allow-config-change: resuming with changed settings, applied from step "
                    f"{self.start + 1}: {'; '.join(self.changes)}",
                    file=sys.stderr,
                )

    def start_tracking(self) -> None:
        """The MLflow run on rank 0 (the checkpoint's run when resuming) and, where previews are drawn, the previewer
        (a sampler over the trained model and the same base models)."""
        config, env = self.config, self.env
        if env.is_main:
            self.tracker = MlflowTracker(
                config.experiment, config.stage, self.run_params(), self.run_tags(), run_id=self.run_id
            )
        self.run_id = D.broadcast_object(self.tracker.run_id, env)
        if config.preview_every >= 0 and (env.is_main or (config.fsdp and env.distributed)):
            sampler = EasyRefSampler(self.model, self.base)
            self.previewer = Previewer(sampler, self.preview_dataset or self.dataset, config)

    def run_params(self) -> dict[str, object]:
        return flatten(to_dict(self.config)) | {
            "world_size": self.env.world_size,
            "global_batch": self.global_batch,
            "init": str(self.init) if self.init else "",
            "resolution": self.resolution,
        }

    def run_tags(self) -> dict[str, str]:
        tags = {
            "git_commit": git_commit(),
            "stage": self.config.stage,
            "world_size": str(self.env.world_size),
            "data_manifest_hash": self.settings["data"],
            "global_batch": str(self.global_batch),
            "settings_hash": resume.settings_hash(self.settings),
        }
        if self.changes:
            tags[f"config_change_at_step_{self.start}"] = "; ".join(self.changes)[:5000]
        return tags

    # -- the loop -----------------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[dict]:
        """This rank's micro-batches from the start step on, in the global order (a pure function of seed and step),
        decoded, drop-drawn and MLLM-processed by ``num_workers`` worker processes (or this one with 0) and pinned for
        a GPU; the loader is started at the first ``next``."""
        config, env = self.config, self.env
        if config.num_workers:  # the tokenizers' own thread pool does not survive the fork into the workers
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.order = GlobalOrderSampler(
            len(self.dataset),
            seed=config.seed,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            rank=env.rank,
            world_size=env.world_size,
            start_step=self.start,
            max_steps=config.max_steps,
        )
        loader = DataLoader(
            EpochIndexed(self.dataset),
            batch_size=config.batch_size,
            sampler=self.order,
            collate_fn=self.conditioner.prepare(config.seed, env.rank),
            num_workers=config.num_workers,
            pin_memory=env.device.type == "cuda",
            drop_last=False,
        )
        return _infinite(loader)

    def train_step(self, step: int, batches: Iterator[dict]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches (gradients synchronised on the last); the loss,
        averaged over micro-batches and ranks, is checked before the update and the weights after it: NaN/inf stops
        the run before anything of it is saved."""
        config, env = self.config, self.env
        micro_losses = []
        for micro in range(config.grad_accum):
            batch = next(batches)
            with autocast_context(env.device, self.dtype):
                cond = self.conditioner(batch, step_generator(config.seed, step, micro, env.rank))
            last = micro == config.grad_accum - 1
            sync = self.objective.no_sync() if self.is_ddp and not last else contextlib.nullcontext()
            with sync:
                with autocast_context(env.device, self.dtype):
                    loss = self.objective(cond)
                (loss / config.grad_accum).backward()
            micro_losses.append(loss.detach().float())
        step_loss = float(D.all_reduce_mean(torch.stack(micro_losses).mean(), env))
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {step_loss} at step {step + 1}; stopped without taking the step or saving. "
                f"Last good checkpoint: {ckpt.latest_checkpoint(self.out) or 'none'}. Check the data (NaN pixels?), "
                f"lower lr ({config.lr}) or use mixed_precision: no"
            )
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if bad := D.nonfinite(self.named_params, env):  # a finite loss can still give a NaN/inf update
            raise TrainingDiverged(
                f"step {step + 1}'s update made {len(bad)} trainable weight tensor(s) NaN or infinite ({bad[0]} ...); "
                f"stopped without saving them. Last good checkpoint: {ckpt.latest_checkpoint(self.out) or 'none'}. "
                f"Lower lr ({config.lr}) or set max_grad_norm"
            )
        return step_loss

    def track(self, done: int, loss: float, seconds: float) -> None:
        """Metrics every ``log_every`` steps and at the last."""
        config = self.config
        if done % config.log_every and done != config.max_steps:
            return
        metrics = {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time_s": seconds,
            "samples_per_s": self.global_batch / seconds,
            "epoch": done * self.global_batch / len(self.dataset),
        }
        if self.env.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.tracker.log_metrics(metrics, step=done)

    def save(self, done: int, loss: float) -> None:
        """A resumable checkpoint every ``save_every`` steps and at the last (``save_every: 0``: none)."""
        config = self.config
        if not config.save_every or (done % config.save_every and done != config.max_steps):
            return
        state = {
            "data": self.order.state(done),
            "mlflow_run_id": self.run_id,
            "loss": loss,
            "stage": config.stage,
            "settings": self.settings,
            "settings_hash": resume.settings_hash(self.settings),
            "data_fingerprint": self.settings["data"],
        }
        ckpt.save_training_state(self.out, done, self.model, self.optimizer, self.env, state, config.keep_last)

    def preview(self, done: int) -> None:
        """A preview grid every ``preview_every`` steps (``0``: at the last step only)."""
        every, last = self.config.preview_every, done == self.config.max_steps
        if self.previewer is not None and ((every > 0 and done % every == 0) or (every == 0 and last)):
            self.previewer(self.tracker, done, self.dtype)

    def save_final(self, step: int) -> Path:
        """The stage's output checkpoint ``OUT/final`` (the trained parts), written by rank 0."""
        config, env = self.config, self.env
        final = self.out / "final"
        tensors = ckpt.trainable_state(self.model) if config.fsdp and env.distributed else None
        if env.is_main:
            extra = {
                "stage": config.stage,
                "step": step,
                "base": {"sdxl": str(self.sdxl), "mllm": str(self.mllm)},
                "data_hash": self.settings["data"],
                "git_commit": git_commit(),
                "mlflow_run_id": self.run_id or "",
            }
            ckpt.save_final(self.model, tensors, final, list(config.parts), **extra)
            print(f"wrote {final}")
        D.barrier(env)
        return final

    def run(self) -> TrainResult:
        """Build, resume, track, then step to ``max_steps`` and write the output."""
        config, env = self.config, self.env
        self.build()
        self.resume()
        self.start_tracking()
        batches = self.batches()
        result = TrainResult(final=self.out / "final", step=self.start, start_step=self.start, run_id=self.run_id)
        if env.is_main:
            print(
                f"stage {config.stage}: steps {self.start}->{config.max_steps}, world size {env.world_size}, "
                f"global batch {self.global_batch}, lr {config.lr}, "
                f"trainable {sum(p.numel() for p in self.params):,} params"
            )
        bar = tqdm(
            total=config.max_steps, initial=self.start, desc=config.stage, disable=not env.is_main, dynamic_ncols=True
        )
        status = "FAILED"
        try:
            for step in range(self.start, config.max_steps):
                t0 = time.perf_counter()
                loss = self.train_step(step, batches)
                seconds, result.step = time.perf_counter() - t0, step + 1
                result.losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                self.track(result.step, loss, seconds)
                self.save(result.step, loss)
                self.preview(result.step)
            bar.close()
            record_caption_cuts(self.tracker, self.conditioner.captions, env, result.step)
            record_cache_counts(self.tracker, self.cache, env, result.step)
            self.save_final(result.step)
            status = "FINISHED"
            return result
        finally:
            bar.close()
            self.tracker.finish(status)
