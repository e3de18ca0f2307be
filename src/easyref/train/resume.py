"""One run per output folder, and a resume only of the same run.

* :func:`output_guard` holds ``OUT``'s exclusive lock (:func:`easyref.locking.output_lock`) for the whole run. Rank 0
  takes it (the ranks of a job share ``OUT``; on several nodes it sits on a shared volume) and tells every rank
  whether it got it, so a refused job stops on all ranks with the holder's name. After an elastic restart
  (``TORCHELASTIC_RESTART_COUNT`` > 0) rank 0 waits up to :data:`RESTART_WAIT_S` for the killed attempt's lock,
  which the kernel drops when that process (and any data-loader child of it) has exited.
* :func:`run_settings` is what makes two runs "the same run": the settings that change what is trained, the
  effective model wiring, the global batch, the data fingerprint and the ``--init`` checkpoint's identity. A
  checkpoint records them with their hash; :func:`check_resume` refuses a resume whose settings differ, unless
  ``--allow-config-change``, which prints each change and lets the new values (lr included) apply.
* :func:`resume_point` picks the newest intact checkpoint of ``OUT`` (rank 0 verifies it) and checks its settings.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from easyref.atomic import restore_interrupted
from easyref.config import flatten, to_dict
from easyref.errors import UserError
from easyref.locking import LOCK_NAME, FolderLocked, output_lock
from easyref.model import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, read_checkpoint_config
from easyref.train import checkpoint as ckpt
from easyref.train import distributed as D
from easyref.train.config import TrainConfig
from easyref.train.data import dataset_fingerprint
from easyref.train.integrity import STATE_FILE, pick_checkpoint

RESTART_WAIT_S = 120.0
# TrainConfig fields that change what a run trains; run length, logging, previews and speed knobs may change freely.
RUN_SETTINGS = (
    "stage",
    "seed",
    "lr",
    "weight_decay",
    "betas",
    "max_grad_norm",
    "resolution",
    "drop_text",
    "drop_image",
    "drop_both",
    "parts",
)


@contextlib.contextmanager
def output_guard(out: Path, env: D.DistEnv) -> Iterator[None]:
    """Hold ``out``'s lock (rank 0) for the ``with`` block; a folder this call created is removed if the run fails
    before writing anything into it."""
    created = not out.exists()
    stack = contextlib.ExitStack()

    def take() -> None:
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        try:
            stack.enter_context(output_lock(out, "train", timeout=RESTART_WAIT_S if restarted else 0.0))
        except FolderLocked as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:  # on rank 0 only: a plain exception would leave the other ranks waiting
            raise UserError(f"--out {out}: cannot create or lock it ({exc})") from exc

    D.on_main(take, env)
    try:
        yield
    except BaseException:
        stack.close()
        if env.is_main and created:
            _remove_if_empty(out)
        raise
    stack.close()


def _remove_if_empty(out: Path) -> None:
    with contextlib.suppress(OSError):
        if [p.name for p in out.iterdir()] == [LOCK_NAME]:
            (out / LOCK_NAME).unlink()
            out.rmdir()


def _digest(text: str | bytes, length: int = 16) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:length]


def init_fingerprint(init: Path | None) -> str:
    """Identity of a ``--init`` checkpoint: its config record (stage, step, MLflow run, ...) and weights' size."""
    if init is None:
        return "none"
    record = (init / CHECKPOINT_CONFIG).read_bytes()
    return _digest(record + str((init / CHECKPOINT_WEIGHTS).stat().st_size).encode())


WEIGHT_SUFFIXES = (".safetensors", ".bin")
EDGE_BYTES = 1 << 20


def base_fingerprint(folders: Iterable[Path]) -> str:
    """Identity of the frozen base models a run trains on: every config file and, for every weight file, its size
    and the sha256 of its first and last MiB (training changes weights throughout, so a re-trained base differs
    there; reading 2 MiB per file keeps this instant for SDXL's gigabytes). A resume on other base models is then a
    changed setting, not a silent continuation (a re-made tiny base behind an unchanged folder name)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if path.suffix in WEIGHT_SUFFIXES:
                size = path.stat().st_size
                with path.open("rb") as f:
                    head = f.read(EDGE_BYTES)
                    f.seek(max(size - EDGE_BYTES, 0))
                    tail = f.read(EDGE_BYTES)
                digest.update(f"{Path(folder).name}/{name} {size}".encode() + head + tail)
            elif path.suffix == ".json":
                digest.update(f"{Path(folder).name}/{name}".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def run_settings(config: TrainConfig, init: Path | None, world_size: int,
                 base: Iterable[Path]) -> dict[str, Any]:
    """The settings a checkpoint records and a resume must match (plain JSON values)."""
    plain = to_dict(config)
    settings = {k: plain[k] for k in RUN_SETTINGS}
    settings["parts"] = sorted(settings["parts"])
    model = copy.deepcopy(read_checkpoint_config(init).model if init is not None else config.model)
    if "lora" in config.parts and not model.lora_rank:
        model.lora_rank = config.lora_rank  # what build_model attaches
    settings["model"] = to_dict(model)
    settings["global_batch"] = config.global_batch(world_size)
    settings["data"] = dataset_fingerprint(config.data) if config.data else "none"
    settings["init"] = init_fingerprint(init)
    settings["base"] = base_fingerprint(base)
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    return _digest(json.dumps(settings, sort_keys=True, separators=(",", ":")), length=64)


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (nested keys dotted)."""
    before, after = flatten(old), flatten(new)
    unset = "(unset)"
    return [
        f"{key}: {before.get(key, unset)} -> {after.get(key, unset)}"
        for key in sorted(set(before) | set(after))
        if before.get(key, unset) != after.get(key, unset)
    ]


def check_resume(checkpoint: Path, record: dict[str, Any], settings: dict[str, Any], allow: bool) -> list[str]:
    """The changes between ``checkpoint``'s settings and this run's; refused (UserError) unless ``allow``."""
    old = record.get("settings")
    if not isinstance(old, dict):
        changes = ["settings: not recorded in the checkpoint (written by an older easyref)"]
    elif record.get("settings_hash") == settings_hash(settings):
        return []
    else:
        changes = changed_settings(old, settings)
    if changes and not allow:
        raise UserError(
            f"{checkpoint}: this run's settings differ from the checkpoint's ({'; '.join(changes)}); resume with the "
            "same settings, use a fresh --out, or pass --allow-config-change to continue with the new ones"
        )
    return changes


def apply_hyperparameters(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """This run's lr, betas and weight decay on every param group (a loaded optimizer state brings its own)."""
    for group in optimizer.param_groups:
        group["lr"], group["betas"], group["weight_decay"] = config.lr, tuple(config.betas), config.weight_decay


def set_aside_name(folder: Path) -> Path:
    """A new ``folder/<UTC time>`` name (``-2``, ``-3``, ... when one of that second exists); ``folder`` is created."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidates = (folder / (stamp if n == 1 else f"{stamp}-{n}") for n in range(1, 10_000))
    return next(c for c in candidates if not c.exists())


def set_aside_old_run(out: Path) -> Path:
    """Move the old settings' ``OUT/final`` and ``OUT/checkpoints`` into a new ``OUT/superseded/<UTC time>/``.

    ``final`` goes first: a run killed in between still holds the old checkpoints, so the next run sets the rest
    aside; a run killed after both moves leaves no ``OUT/final`` of the old settings to be taken for its own.
    """
    aside = set_aside_name(out / "superseded")
    aside.mkdir()
    final = out / "final"
    restore_interrupted(final)  # a save killed between its two renames: the old final is complete beside it
    if final.exists():
        final.rename(aside / "final")
    ckpt.checkpoint_root(out).rename(aside / "checkpoints")
    return aside


def resume_point(
    out: Path, settings: dict, allow: bool, env: D.DistEnv, restart: bool = False
) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (rank 0 verifies and picks it) and the settings that changed since.

    With ``restart`` (``--restart-on-config-change``, what a DVC stage wants after a params.yaml edit), checkpoints
    whose settings differ from this run's are set aside, not resumed and not deleted: rank 0 moves ``OUT/final`` and
    ``OUT/checkpoints`` into ``OUT/superseded/<UTC time>/`` (suffixed ``-2``, ... within one second; see
    :func:`set_aside_old_run`) and the run starts at step 0.
    """

    def pick() -> str | None:  # verifies checksums and sets damaged checkpoints aside: one process does it
        path = pick_checkpoint(ckpt.step_folders(out))
        if path is None or not restart:
            return str(path) if path else None
        changes = check_resume(path, json.loads((path / STATE_FILE).read_text()), settings, allow=True)
        if not changes:
            return str(path)
        aside = set_aside_old_run(out)
        print(
            f"{path}: its settings differ from this run's ({'; '.join(changes)}); starting at step 0, the old "
            f"checkpoints and final are set aside in {aside} (delete it when not needed)"
        )
        return None

    picked = D.on_main(pick, env)
    if picked is None:
        return None, []
    latest = Path(picked)
    record = json.loads((latest / STATE_FILE).read_text())
    return latest, check_resume(latest, record, settings, allow)
