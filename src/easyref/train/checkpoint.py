"""Resumable training checkpoints: written atomically, the last K kept, loaded without unpickling.

A checkpoint is a folder ``OUT/checkpoints/step_NNNNNNNN/``::

    trainable.safetensors     the trainable weights (full, unsharded; keys are EasyRef parameter names)
    optimizer.safetensors     AdamW moments and step counts, keyed ``<param>/<name>``
    optimizer.json            the optimizer's param groups (hyper-parameters, parameter names)
    rng_rank<R>.safetensors   each rank's torch (and CUDA) RNG state; Python and NumPy states in its metadata
    state.json                step, data-order state, world size, MLflow run id, the run's settings and their
                              hash, the data fingerprint (see :mod:`easyref.train.resume`)
    checksums.sha256          SHA-256 of every file above (see :mod:`easyref.train.integrity`; written last)

It is written by :class:`easyref.atomic.FolderWriter`: assembled in ``.step_NNNNNNNN.tmp``, flushed to disk,
checksummed, read back and renamed into place, so a folder named ``step_*`` is always complete; a crash leaves at
most a temp folder, which the next save of that step removes, and a full disk removes it at once and says which
checkpoint is intact. Older checkpoints are pruned only after the new one verified, so with ``keep_last: 1`` the
previous one survives a failed save. Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``, so
the same files serve DDP, FSDP2 and a single process.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from easyref.atomic import FolderWriter, NotVerified
from easyref.errors import UserError
from easyref.model import EasyRef, load_weights, write_checkpoint
from easyref.train.distributed import DistEnv, barrier
from easyref.train.integrity import STATE_FILE

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def step_folders(out: Path) -> list[Path]:
    """Every ``step_*`` folder under ``out``, oldest first (complete or damaged; temp folders excluded)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under ``out`` (those with a ``state.json``), oldest first."""
    return [p for p in step_folders(out) if (p / STATE_FILE).is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def _full_options(**kw: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) trainable weights; under FSDP only rank 0 receives them, other ranks get ``{}``."""
    return get_model_state_dict(model, options=_full_options())


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": json.dumps(random.getstate(), default=list),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = json.loads(meta["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = json.loads(meta["numpy"])
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("/")
        state.setdefault(name, {})[field] = value
    for name, entry in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    out: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    env: DistEnv,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write the checkpoint of ``step`` (every rank calls this), then prune to the last ``keep_last``.

    A failed write (a full disk) is one :class:`UserError` naming the checkpoint that stays intact; the temp folder
    is removed. A checkpoint that does not verify when read back is not kept (a warning; training goes on and no
    older checkpoint is pruned).
    """
    root = checkpoint_root(out)
    target = root / f"step_{step:08d}"
    previous = latest_checkpoint(out)
    intact = (
        f"the last checkpoint, {previous.name}, is intact (a resume starts there)"
        if previous is not None
        else "no earlier checkpoint exists"
    )
    writer = FolderWriter(
        target, intact=f"{intact}; the partial .{target.name}.tmp was removed", required=(STATE_FILE,)
    )
    model_sd = trainable_state(model)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if env.is_main:
        writer.start()
    barrier(env)
    rng_tensors, rng_meta = _rng_state()
    with writer.failing_cleanly(abort=env.is_main):
        writer.save_tensors(f"rng_rank{env.rank}.safetensors", rng_tensors, metadata=rng_meta)
    barrier(env)
    if env.is_main:
        with writer.failing_cleanly():
            writer.save_tensors("trainable.safetensors", {k: v.contiguous() for k, v in model_sd.items()})
            optim_tensors, optim_meta = _flatten_optimizer(optim_sd)
            writer.save_tensors("optimizer.safetensors", optim_tensors)
            writer.write_text("optimizer.json", json.dumps(optim_meta, indent=1, default=_json_default) + "\n")
            record = {"step": step, "world_size": env.world_size, **state}
            writer.write_text(STATE_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            writer.commit()
        except NotVerified as exc:
            print(f"warning: {exc}; older checkpoints are kept", file=sys.stderr)
        else:
            for old in list_checkpoints(out)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return target


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG from ``path``; returns its ``state.json``."""
    record = json.loads((path / STATE_FILE).read_text())
    weights = load_weights(path / "trainable.safetensors")
    expected = set(trainable_state_keys(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise UserError(
            f"{path}: training checkpoint does not fit this run's trainable parameters "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); use a fresh --out for a different stage or model"
        )
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    optim_meta = json.loads((path / "optimizer.json").read_text())
    osd = _unflatten_optimizer(load_weights(path / "optimizer.safetensors"), optim_meta)
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    rng_file = path / f"rng_rank{env.rank}.safetensors"
    if rng_file.is_file():
        from safetensors import safe_open

        with safe_open(rng_file, framework="pt") as fh:
            meta = fh.metadata()
        _set_rng_state(load_weights(rng_file), meta)
    return record


def trainable_state_keys(model: nn.Module) -> list[str]:
    """Names of the trainable parameters (the keys of :func:`trainable_state`; pass the unwrapped model)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def save_final(
    model: EasyRef, tensors: dict[str, torch.Tensor] | None, out: Path, parts: list[str], **extra: Any
) -> Path:
    """The stage's output, the format ``--init`` and ``easyref generate --checkpoint`` read, written by
    :func:`easyref.model.write_checkpoint` (the one writer; the previous ``out`` survives a crash or a full disk).

    Unsharded models pass ``tensors=None`` (their own state); for FSDP pass the gathered ``tensors`` (rank 0).
    """
    if tensors is None:
        tensors = model.state_dict_of(parts)
    return write_checkpoint(out, model.config, tensors, parts, **extra)
