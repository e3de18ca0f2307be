"""The torchrun environment: rank, world size, device, process group, and wrapping a module in DDP or FSDP2.

The same code runs as a plain process (no ``WORLD_SIZE``: one rank, no process group), under
``torchrun``/``torchx`` on one machine, and on a cluster where the Kubeflow Trainer sets the same variables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from easyref.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(timeout_s: float = 1800) -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and start the process group (NCCL on GPU, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        # torchrun keeps its store across worker restarts: a per-attempt prefix keeps a restarted group from
        # reading the dead workers' addresses (seen with gloo as a hang or "connection refused" after SIGKILL).
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"easyref/attempt_{attempt}", store)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


GLOO_SETTLE_S = 0.5
"""Seconds the main thread sleeps before a gloo process group is destroyed (see :func:`teardown`)."""


def teardown(settle_s: float = GLOO_SETTLE_S) -> None:
    """End the process group, if there is one. Drop every user of the group first (a DDP wrapper, an FSDP mesh):
    the group's destructor must run here, where it is safe, not wherever the last of them is freed later.

    gloo runs collectives on its own worker threads, and a worker retires a finished collective while holding the
    group's work lock; freeing a tensor that Python has seen (the loss, a broadcast object) takes the GIL there. The
    group's destructor takes the same lock, and it runs in the thread that drops the last reference, with the GIL
    held. Destroyed right after the last collective (the barrier after the final checkpoint), the two can wait on
    each other forever: seen (stacks taken with gdb) as a rank that wrote ``final`` and never exited, once in 24
    two-process stages of the pipeline run twice at once on 2 cores. Sleeping ``settle_s`` first releases the GIL
    while the workers retire their last collectives."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        time.sleep(settle_s)
    dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; ``value`` is unchanged)."""
    out = value.detach().clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= env.world_size
    return out


def sum_counts(counts: list[int], env: DistEnv) -> list[int]:
    """Integer counts summed over ranks (every rank gets the totals)."""
    local = torch.tensor(counts, dtype=torch.float64, device=env.device)
    return [round(float(x)) for x in all_reduce_mean(local, env) * env.world_size]


def nonfinite(named: list[tuple[str, torch.Tensor]], env: DistEnv) -> list[str]:
    """Names of the tensors with a NaN or an inf element on any rank (each rank checks its own shard; every rank
    gets the same answer). One max-abs reduction per tensor and one all-reduce."""
    local = [t.to_local() if hasattr(t, "to_local") else t for _, t in named]  # FSDP2 DTensor -> this rank's shard
    flags = torch.zeros(len(local), dtype=torch.float32, device=env.device)
    filled = [i for i, t in enumerate(local) if t.numel()]  # a shard can be empty
    if filled:
        with torch.no_grad():
            norms = torch._foreach_norm([local[i].detach() for i in filled], float("inf"))
            flags[filled] = (~torch.stack([n.float() for n in norms]).isfinite()).float()
    bad = all_reduce_mean(flags, env).cpu().tolist()
    return [name for (name, _), flag in zip(named, bad, strict=True) if flag > 0]


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], env: DistEnv) -> T:
    """``fn()`` run on rank 0 only, its result on every rank; a :class:`UserError` there is raised on every rank.

    For decisions one process must take (a lock, which checkpoint to resume) without leaving the other ranks
    waiting forever in the next collective when it fails.
    """
    value, error = None, None
    if env.is_main:
        try:
            value = fn()
        except UserError as exc:
            error = str(exc)
    value, error = broadcast_object((value, error), env)  # type: ignore[misc]
    if error is not None:
        raise UserError(error)
    return value  # type: ignore[return-value]


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """Replicate ``module`` with DDP (gradients of its trainable parameters are all-reduced)."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def shard_fsdp(model: nn.Module, env: DistEnv, param_dtype: torch.dtype | None = None) -> None:
    """Shard EasyRef in place with FSDP2: one unit per MLLM decoder layer and UNet block, then the MLLM and UNet.

    The reference encoder and the UNet are their own units, so the sampler can call them directly (previews).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp}
    encoder, unet = model.reference_encoder, model.unet
    for layer in [*encoder.mllm.language_model.layers, *encoder.head]:
        fully_shard(layer, **kwargs)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            fully_shard(block, **kwargs)
    fully_shard(encoder, **kwargs)
    fully_shard(unet, **kwargs)
