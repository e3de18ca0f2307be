"""Plan a training stage before spending GPUs: parameters, memory per GPU, whether it fits a card, FLOPs per sample.

Everything is computed on the meta device from the config files of the profile (no download, no GPU, about a
minute on a laptop for the real profile):

* parameters, total and trainable, per part, from the project's own model built at the real sizes;
* memory per GPU: weights (fp32, as the trainer keeps them; bf16 autocast for compute), gradients (fp32) and
  AdamW state (two fp32 moments) of the trainable parameters (``param_dtype`` of :func:`make_plan`: in that dtype
  instead, e.g. bf16 for ``benchmarks/full_size_step.py``, which holds bf16 weights to fit a 24 GB CPU machine), sharded over the GPUs with ``--fsdp``; the frozen
  VAE and text encoders are replicated. Activations are the bytes autograd saves for the backward pass of one
  micro-batch, traced through the step's real ops on meta tensors (see :mod:`easyref.plan_measure`); the estimate
  leaves out allocator fragmentation, the CUDA context, transient buffers and FSDP's gathered units, so a card
  "fits" only with 10% of its memory left over;
* FLOPs per sample of the MLLM trunk, its head, the UNet, the VAE and the text encoders (forward + backward,
  including recomputation under gradient checkpointing), and for stage 1 the saving of the efficient aggregation:
  the MLLM's FLOPs with the trunk run without gradients against reference tokens at layer 0 with the whole MLLM
  trained.

  easyref plan --profile real --stage pretrain --gpus 32 --batch 8 --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from easyref.errors import UserError

HELP = "plan a stage: parameters, memory per GPU, fit on 80/141 GB cards, FLOPs per sample"
CARDS_GB = (80, 141)
HEADROOM = 0.9
"""A plan fits a card when its estimate is at most this fraction of the card's memory."""
GB = 1e9
LIMITS = {"gpus": 100_000, "batch": 1024, "references": 32, "resolution": 4096, "ref_side": 1344}
"""Largest values of the flags: 4096 px is the largest side `easyref generate` takes (16x SDXL's 1024 px tokens),
32 references what serving accepts (``easyref.registry.pyfunc.MAX_REFERENCES``), 1344 px a reference of 2304 patches."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="real", help="'real' (configs in the package) or a model tree folder")
    parser.add_argument("--stage", required=True, choices=("pretrain", "single_ref", "multi_ref"))
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="samples per GPU per micro-step (default 8)")
    parser.add_argument("--resolution", type=int, default=1024, help="target side in pixels (default 1024)")
    parser.add_argument("--references", type=int, default=2, help="reference images per sample (default 2)")
    parser.add_argument("--ref-side", type=int, default=336, help="reference side in pixels, multiple of 28")
    parser.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks / MLLM layers")
    parser.add_argument("--json", type=Path, default=None, help="also write the plan as JSON to this file")


@dataclass
class Plan:
    stage: str
    gpus: int
    batch: int
    resolution: int
    references: int
    fsdp: bool
    gradient_checkpointing: bool
    params: dict[str, int]
    trainable: dict[str, int]
    memory_gb: dict[str, float]
    fits: dict[str, bool]
    tflops_per_sample: dict[str, float]
    aggregation: dict[str, float] | None
    context_tokens: int
    ip_layers: int


def check_shape(gpus: int, batch: int, resolution: int, references: int, ref_side: int) -> None:
    """Each flag within :data:`LIMITS` (a plan past them traces for minutes and answers nothing useful)."""
    for name, value in (("gpus", gpus), ("batch", batch), ("references", references)):
        if not 1 <= value <= LIMITS[name]:
            raise UserError(f"--{name} must be between 1 and {LIMITS[name]}, got {value}")
    if not 64 <= resolution <= LIMITS["resolution"] or resolution % 64:
        raise UserError(f"--resolution must be a multiple of 64 from 64 to {LIMITS['resolution']}, got {resolution}")
    if not 28 <= ref_side <= LIMITS["ref_side"] or ref_side % 28:
        raise UserError(f"--ref-side must be a multiple of 28 from 28 to {LIMITS['ref_side']}, got {ref_side}")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be written (a folder, under a file, a read-only folder) before any work."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name such as {path / 'plan.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a folder; give a file path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable; give a file path under a writable folder")


def make_plan(
    profile: str,
    stage: str,
    gpus: int,
    batch: int,
    resolution: int,
    references: int = 2,
    ref_side: int = 336,
    fsdp: bool = False,
    gradient_checkpointing: bool = False,
    compare_aggregation: bool = True,
    num_tokens: int = 64,
    param_dtype: Any = None,
    text_tokens: int | None = None,
) -> Plan:
    import torch

    from easyref.architectures import config_root
    from easyref.plan_measure import PLAN_PARTS, trace_step
    from easyref.train.config import STAGE_DEFAULTS

    check_shape(gpus, batch, resolution, references, ref_side)
    root = config_root(profile)
    defaults = STAGE_DEFAULTS[stage]
    parts, rank = list(defaults["parts"]), int(defaults["lora_rank"])
    size = torch.finfo(param_dtype or torch.float32).bits // 8
    shape = dict(
        batch=batch,
        resolution=resolution,
        references=references,
        ref_side=ref_side,
        num_tokens=num_tokens,
        gradient_checkpointing=gradient_checkpointing,
        param_dtype=param_dtype,
        text_tokens=text_tokens,
    )
    trace = trace_step(root, parts, rank, **shape)
    shard = gpus if fsdp else 1
    model_params = sum(trace.params[p] for p in PLAN_PARTS)
    trainable = sum(trace.trainable.values())
    memory = {
        "weights": size * model_params / shard / GB,
        "frozen_vae_text": size * (trace.params["vae"] + trace.params["text_encoders"]) / GB,
        "gradients": size * trainable / shard / GB,
        "optimizer": 2 * size * trainable / shard / GB,
        "activations": sum(c.saved_bytes for c in trace.components.values()) / GB,
    }
    memory["total"] = sum(memory.values())
    flops = {name: (c.forward_flops + c.backward_flops) / batch / 1e12 for name, c in trace.components.items()}
    flops["total"] = sum(flops.values())
    aggregation = None
    if "mllm" not in parts and compare_aggregation:
        alt = trace_step(root, [*parts, "mllm"], rank, **shape, tokens_at_layer0=True)
        ours = flops["mllm_trunk"] + flops["mllm_head"]
        layer0 = sum(
            (alt.components[n].forward_flops + alt.components[n].backward_flops) / batch / 1e12
            for n in ("mllm_trunk", "mllm_head")
        )
        aggregation = {
            "mllm_tflops_efficient": ours,
            "mllm_tflops_layer0_full": layer0,
            "ratio": layer0 / ours,
            "step_ratio": (flops["total"] - ours + layer0) / flops["total"],
        }
    return Plan(
        stage=stage,
        gpus=gpus,
        batch=batch,
        resolution=resolution,
        references=references,
        fsdp=fsdp,
        gradient_checkpointing=gradient_checkpointing,
        params=trace.params,
        trainable=trace.trainable,
        memory_gb=memory,
        fits={f"{gb} GB": memory["total"] <= HEADROOM * gb for gb in CARDS_GB},
        tflops_per_sample=flops,
        aggregation=aggregation,
        context_tokens=trace.context_tokens,
        ip_layers=trace.ip_layers,
    )


def format_plan(plan: Plan) -> str:
    mode = "FSDP" if plan.fsdp else "DDP"
    gc = ", gradient checkpointing" if plan.gradient_checkpointing else ""
    lines = [
        f"stage {plan.stage}: {plan.gpus} GPU(s) x batch {plan.batch} (global {plan.gpus * plan.batch}), "
        f"{plan.resolution}^2 px, {plan.references} reference(s) ({plan.context_tokens} context tokens), {mode}{gc}",
        "",
        f"{'part':<16}{'params (M)':>14}{'trainable (M)':>16}",
    ]
    for name, n in plan.params.items():
        lines.append(f"{name:<16}{n / 1e6:>14.1f}{plan.trainable[name] / 1e6:>16.1f}")
    lines.append(f"{'total':<16}{sum(plan.params.values()) / 1e6:>14.1f}{sum(plan.trainable.values()) / 1e6:>16.1f}")
    lines.append(f"IP layers: {plan.ip_layers}")
    lines += ["", "memory per GPU (GB)"]
    lines += [f"  {name:<18}{gb:>8.1f}" for name, gb in plan.memory_gb.items()]
    lines.append(
        "  fits (<= 90% of the card): " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in plan.fits.items())
    )
    lines += ["", "TFLOPs per sample (forward + backward)"]
    lines += [f"  {name:<18}{tf:>8.2f}" for name, tf in plan.tflops_per_sample.items()]
    if plan.aggregation:
        a = plan.aggregation
        lines += [
            "",
            f"efficient aggregation: MLLM {a['mllm_tflops_efficient']:.2f} TFLOPs/sample (trunk without gradients) vs "
            f"{a['mllm_tflops_layer0_full']:.2f} with tokens at layer 0 and the whole MLLM trained: "
            f"{a['ratio']:.2f}x on the MLLM, {a['step_ratio']:.2f}x on the whole step",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    check_shape(args.gpus, args.batch, args.resolution, args.references, args.ref_side)
    plan = make_plan(
        args.profile,
        args.stage,
        args.gpus,
        args.batch,
        args.resolution,
        args.references,
        args.ref_side,
        args.fsdp,
        args.gradient_checkpointing,
    )
    print(format_plan(plan))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan_dict(plan), indent=2) + "\n")
    return 0


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
