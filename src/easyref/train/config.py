"""Training configuration: one :class:`TrainConfig` per stage, filled from ``params.yaml`` and CLI flags.

``params.yaml`` holds a ``train:`` mapping whose plain keys apply to every stage and whose ``pretrain:``,
``single_ref:`` and ``multi_ref:`` sub-mappings override them for one stage, e.g.::

    train:
      base: models/tiny
      batch_size: 2
      pretrain:   {max_steps: 300}
      single_ref: {max_steps: 100}

Keys left unset take the stage's defaults (:data:`STAGE_DEFAULTS`: learning rate, trainable parts, LoRA rank).
The top-level ``model:`` mapping (if any) is the :class:`~easyref.model.ModelConfig` of a stage that starts
without ``--init``; a stage started from a checkpoint takes the checkpoint's model config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from easyref.config import from_dict, load_yaml
from easyref.errors import UserError
from easyref.model import PARTS, ModelConfig

Stage = Literal["pretrain", "single_ref", "multi_ref"]
STAGES: tuple[str, ...] = ("pretrain", "single_ref", "multi_ref")

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a larger lr overflows to inf in the optimizer's float32 arithmetic."""
MAX_SEED = 2**63 - 1

# The paper's three stages: lr 1e-4 / 4e-5 / 2e-5 (LoRA rank 128 as in the authors' code).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"lr": 1e-4, "parts": ["reference", "adapter"], "lora_rank": 0},
    "single_ref": {"lr": 4e-5, "parts": list(PARTS), "lora_rank": 128},
    "multi_ref": {"lr": 2e-5, "parts": list(PARTS), "lora_rank": 128},
}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one training stage needs besides ``--init`` and ``--out``."""

    stage: Stage = "pretrain"
    """Which of the three progressive stages this is (the paper's progressive training)."""
    base: str = "models/tiny"
    """Folder holding the base models ``sdxl/`` and ``mllm/``."""
    data: str = "data/split/train.parquet"
    """Training samples: a split manifest (``.parquet``) or a folder of groups (``<group>/<image>`` + ``captions.jsonl``)."""
    image_root: str = "data/ingested"
    """Folder the image paths of a split table are relative to (the ``easyref ingest`` output)."""
    preview_data: str = ""
    """Samples whose references drive the preview grids (e.g. the held-in split); empty = the training data."""
    lr: float | None = None
    """AdamW learning rate, constant (default per stage: 1e-4 / 4e-5 / 2e-5)."""
    weight_decay: float = 0.0
    """AdamW weight decay (paper: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this value (0 = no clipping, as in the paper)."""
    batch_size: int = 1
    """Samples per device per micro-step."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step; global batch = batch_size x grad_accum x world size."""
    max_steps: int = 1000
    """Optimizer steps to reach; a resumed run continues up to this step."""
    resolution: int = 0
    """Side of the square training target in pixels (0 = the UNet's native size, 1024 for SDXL)."""
    save_every: int = 500
    """Write a resumable training checkpoint every this many steps (0 = only the final weights)."""
    keep_last: int = 2
    """How many training checkpoints to keep (older ones are deleted after a new one is complete)."""
    log_every: int = 1
    """Log metrics to MLflow every this many steps."""
    preview_every: int = 0
    """Log a preview grid every this many steps (0 = only after the last step; negative = never)."""
    preview_samples: int = 4
    """Samples (reference group + caption) in the preview grid, the first ones of ``preview_data``."""
    preview_steps: int = 30
    """DDIM steps of the preview sampler."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """bf16 autocast; ``auto`` = bf16 on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute UNet blocks and MLLM layers in the backward pass instead of storing activations."""
    fsdp: bool = False
    """Shard the model with FSDP2 (``fully_shard``) instead of replicating it with DDP; for stages 2-3."""
    drop_text: float = 0.1
    """Probability that a sample's caption is dropped (empty for the MLLM and the SDXL text encoders)."""
    drop_image: float = 0.1
    """Probability that a sample's references are dropped (one black image instead)."""
    drop_both: float = 0.1
    """Probability that both are dropped. The three events are exclusive, drawn once per sample."""
    noise_offset: float = 0.0
    """Offset noise: each latent channel's training noise gets one more normal draw times this, shared by all its
    pixels (diffusers' ``--noise_offset``). Give the value the base was trained with (SDXL's report: 0.05; the tiny
    base: 0.3), so that the adapter learns on the noise its UNet knows; 0 = plain Gaussian noise."""
    seed: int = 0
    """Seed of the data order, the noise, the timesteps, the CFG drops and freshly initialised weights."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    cache_dir: str = ""
    """Folder of the conditioning cache: the targets' VAE posteriors and the captions' text states, keyed by content
    and the base's fingerprint, shared by ranks and runs (empty = off; same losses either way)."""
    compile_unet: bool = False
    """``torch.compile`` the UNet (not with ``fsdp``; needs a C++ compiler on CPU). Same loss up to float rounding."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend of ``compile_unet``: ``inductor`` generates fused kernels (the speed-up);
    ``aot_eager`` only captures the graphs and runs them with the eager kernels (checks a model compiles, in seconds)."""
    parts: list[str] | None = None
    """Trainable parts (see ``easyref.model.PARTS``); default per stage."""
    lora_rank: int | None = None
    """UNet LoRA rank when the stage trains ``lora`` and the init checkpoint has none (default 128)."""
    experiment: str = "easyref-train"
    """MLflow experiment name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model wiring for a stage that starts without ``--init`` (a checkpoint brings its own)."""

    def __post_init__(self) -> None:
        defaults = STAGE_DEFAULTS[self.stage]
        if self.lr is None:
            self.lr = defaults["lr"]
        if self.parts is None:
            self.parts = list(defaults["parts"])
        if self.lora_rank is None:
            self.lora_rank = defaults["lora_rank"]
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
        if "lora" in self.parts and not self.lora_rank:
            raise ValueError("parts includes 'lora' but lora_rank is 0")
        for name in ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every", "preview_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        self._check_numbers()
        probs = (self.drop_text, self.drop_image, self.drop_both)
        if any(p < 0 for p in probs) or sum(probs) > 1:
            raise ValueError(f"drop probabilities must be >= 0 and sum to <= 1, got {probs}")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0, got {self.resolution}")
        if self.compile_unet and self.fsdp:
            raise ValueError(
                "compile_unet is not supported with fsdp (untested: FSDP2 wants each block compiled after fully_shard); "
                "set one of them to false"
            )

    def _check_numbers(self) -> None:
        """The optimizer's numbers finite and in range (a NaN or an inf lr trains a model of NaNs), counts >= 0."""
        assert self.lr is not None
        if not (math.isfinite(self.lr) and 0 < self.lr <= FLOAT32_MAX):
            raise ValueError(
                f"lr must be a finite number > 0 (and at most {FLOAT32_MAX:.4g}, the largest float32), got {self.lr}"
            )
        for name in ("weight_decay", "max_grad_norm", "noise_offset"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must both be in [0, 1), got {list(self.betas)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = load in the training process), got {self.num_workers}")

    def global_batch(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size


def load_train_config(params: str | Path | None, stage: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config of ``stage``: ``train:`` shared keys, then ``train.<stage>:``, then ``overrides`` (CLI flags)."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    data = load_yaml(params) if params is not None else {}
    where = f"{params}: train" if params is not None else "train"
    section = data.get("train") or {}
    if not isinstance(section, dict):
        raise UserError(f"{where}: expected a mapping, got {section!r}")
    merged = {k: v for k, v in section.items() if k not in STAGES}
    stage_section = section.get(stage) or {}
    if not isinstance(stage_section, dict):
        raise UserError(f"{where}.{stage}: expected a mapping, got {stage_section!r}")
    merged.update(stage_section)
    if "model" not in merged and isinstance(data.get("model"), dict):
        merged["model"] = data["model"]
    valid = {f.name for f in fields(TrainConfig)}
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None and k in valid})
    merged["stage"] = stage
    return from_dict(TrainConfig, merged, where=where)
