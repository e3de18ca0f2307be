"""One full-size training step on CPU: the real architectures with random bf16 weights, through the trainer's code.

  nice -n 10 python benchmarks/full_size_step.py --threads 2 --out outputs/full_size_step.json

Builds SDXL base 1.0 (UNet, VAE, both text encoders) and Qwen2-VL-2B-Instruct from the config files in the package
(``src/easyref/configs/real``; no download) with random weights in bf16, and the project's ``EasyRef`` over them:
reference tokens appended at the last of the MLLM's 28 decoder layers, the real M-RoPE sections, 70 decoupled
cross-attention layers, the UNet LoRA on its attention q/k/v/out. Then, through the training loop's own code
(``easyref.train.loop.Trainer``'s ``build_optimizer`` and ``train_step``: the recipe's ``Conditioner`` and
``DiffusionObjective`` under bf16 autocast, the loss check, AdamW):

1. stage 1 (``pretrain``): one optimizer step on the reference head + tokens and the adapter;
2. stage 2 (``single_ref``): one forward/backward with the whole MLLM, the adapter and a rank-128 UNet LoRA trainable.
   No optimizer step: AdamW's two moments of 2.7B parameters do not fit 24 GB beside the weights and gradients.
   Once the conditioning is computed the frozen VAE and text encoders are released (``--keep-frozen`` keeps them),
   as a run with cached latents and text states would not hold them.

Both stages run with gradient checkpointing, at ``--resolution`` px with ``--references`` square references of the
largest side the model keeps whole (336 px: 144 visual tokens each), drop probabilities 0 (every sample keeps its
references and caption). The Trainer's ``__init__`` and ``build`` (which load a model tree from disk and claim an
output folder) are skipped: the benchmark hands it the random models instead.

Reported: parameters per part (beside ``easyref plan``'s and the paper's figures), the structure that ran (decoder
layers, M-RoPE sections, IP layers, LoRA-wrapped layers, MLLM context), per stage the seconds of one cold step, the
loss, which trainable parts received gradients, the peak RSS and the peak above the RSS before the models were
built, set against ``easyref plan``'s estimate for the same settings (bf16 weights, gradients and AdamW moments, this
run's MLLM context; stage 2 without optimizer state and, when released, without the frozen parts). Peak RSS is the
kernel's high-water mark (``VmHWM``), reset between phases through ``/proc/self/clear_refs``; where that is not
available, ``getrusage``'s lifetime maximum. ``--profile tiny`` runs the same code on a tiny tree in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from easyref.architectures import (  # noqa: E402
    REAL_CONFIGS,
    build_easyref,
    profile_model_config,
    random_base_models,
    reference_side,
)
from easyref.plan_measure import part_counts, plan_part  # noqa: E402

GB = 1e9
TOLERANCE = 0.15
"""Stated before the first full-size run: the measured peak above the pre-build RSS is within 15% of the plan's
total. Weights, gradients and optimizer state are exact arithmetic; the rest (activations, transient buffers,
allocator slack) is what the plan estimates or leaves out."""
PAPER_M = {"ip_kv": 340.8, "projector": 5.5, "mllm_head": 46.9, "lora": 185.8, "mllm": 2210.0, "unet": 2570.0}
"""The counts (millions) the paper's set-up implies (docs/performance.md); ``mllm`` = head + trunk."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="real", help="'real' (the package's configs) or a tiny model tree folder")
    p.add_argument("--resolution", type=int, default=256, help="target side in pixels, multiple of 64 (default 256)")
    p.add_argument("--references", type=int, default=2, help="reference images per sample (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op CPU threads (default 2)")
    p.add_argument("--lora-rank", type=int, default=128, help="stage-2 UNet LoRA rank (default 128)")
    p.add_argument("--stages", default="pretrain,single_ref", help="comma-separated: pretrain, single_ref")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--keep-frozen", action="store_true", help="keep the VAE and text encoders through stage 2")
    p.add_argument(
        "--tiny", type=Path, default=None, help="tiny tree for the tokenizers (default: written to a tmp dir)"
    )
    p.add_argument("--no-plan", dest="plan", action="store_false", help="skip the comparison with `easyref plan`")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in ("pretrain", "single_ref")]
    if bad or not args.stages:
        p.error(f"--stages: {', '.join(bad) or 'none given'}; choose from pretrain, single_ref")
    if args.resolution < 64 or args.resolution % 64:
        p.error(f"--resolution must be a multiple of 64, got {args.resolution}")
    for name in ("references", "threads", "lora_rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class Rss:
    """Resident set size of this process: current, and the peak since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.resettable = self.reset()

    @staticmethod
    def _status(key: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def reset(self) -> bool:
        """Start a new peak (Linux: ``5`` into ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS)."""
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the next peak starts clean
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def current(self) -> float:
        return (self._status("VmRSS") or 0) / GB

    def peak(self) -> float:
        hwm = self._status("VmHWM") if self.resettable else None
        return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / GB


def sample_batch(processor, resolution: int, references: int, side: int) -> dict:
    """One training sample (random target, square references, a caption) through the loop's ``collate``."""
    from PIL import Image, ImageDraw

    from easyref.train.data import collate

    refs = []
    for i in range(references):
        image = Image.new("RGB", (side, side), (40 + 60 * i, 90, 160))
        ImageDraw.Draw(image).ellipse((side // 8 + 5 * i, side // 6, side * 3 // 4, side * 5 // 6), fill=(230, 40, 40))
        refs.append(image)
    target = torch.rand(3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    caption = "a red circle on a blue wall"
    sample = {
        "references": refs,
        "target": target,
        "caption": caption,
        "original_size": (resolution, resolution),
        "crop_top_left": (0, 0),
    }
    return collate([sample])


def trainer_for(stage: str, model, base, args: argparse.Namespace, out: Path):
    """A :class:`~easyref.train.loop.Trainer` of ``stage`` over the models built here: its own ``build_optimizer``
    (gradient checkpointing, trainable parts, objective, AdamW) has run; ``__init__`` and ``build`` are skipped."""
    from easyref.train.config import TrainConfig
    from easyref.train.distributed import DistEnv
    from easyref.train.loop import Trainer
    from easyref.train.recipe import Conditioner, autocast_dtype

    config = TrainConfig(
        stage=stage,
        mixed_precision="bf16",
        gradient_checkpointing=args.gradient_checkpointing,
        lora_rank=args.lora_rank,
        drop_text=0.0,
        drop_image=0.0,
        drop_both=0.0,
        model=model.config,
    )
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.out, trainer.init = config, out, None
    trainer.env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer.dtype = autocast_dtype(config, trainer.env.device)
    trainer.model, trainer.base = model, base
    trainer.conditioner = Conditioner(base, (config.drop_text, config.drop_image, config.drop_both))
    trainer.build_optimizer()
    return trainer


def gradient_coverage(model) -> dict[str, float]:
    """Per part: the fraction of its trainable parameters that received a gradient."""
    seen: dict[str, list[int]] = {}
    for key, p in model.named_parameters():
        if p.requires_grad:
            got = seen.setdefault(plan_part(key), [0, 0])
            got[0] += p.grad is not None
            got[1] += 1
    return {part: with_grad / total for part, (with_grad, total) in seen.items()}


def run_pretrain(model, base, batch, args, rss: Rss, tmp: Path) -> dict:
    trainer = trainer_for("pretrain", model, base, args, tmp / "pretrain")
    trainable = sum(p.numel() for p in trainer.params)
    rss.reset()
    start = time.perf_counter()
    loss = trainer.train_step(0, iter([batch]))  # raises TrainingDiverged on a NaN/inf loss
    seconds = time.perf_counter() - start
    stepped = sum(1 for p in trainer.params if trainer.optimizer.state.get(p))
    result = {
        "trainable": trainable,
        "loss": loss,
        "step_s": seconds,
        "peak_rss_gb": rss.peak(),
        "optimizer_stepped_fraction": stepped / len(trainer.params),
    }
    del trainer
    return result


def run_single_ref(model, base, arch, batch, args, rss: Rss, tmp: Path) -> dict:
    from easyref.train.recipe import autocast_context, step_generator

    model.add_lora(args.lora_rank)
    model.to(torch.bfloat16)  # peft creates the LoRA weights in float32
    trainer = trainer_for("single_ref", model, base, args, tmp / "single_ref")
    trainable = sum(p.numel() for p in trainer.params)
    rss.reset()
    device, dtype = trainer.env.device, trainer.dtype
    start = time.perf_counter()
    with autocast_context(device, dtype):
        cond = trainer.conditioner(batch, step_generator(trainer.config.seed, 0, 0, 0))
    conditioned = time.perf_counter()
    if not args.keep_frozen:
        for module in (arch.vae, arch.text_encoder, arch.text_encoder_2):
            module.to("meta")  # frees their storage; nothing below uses them
        gc.collect()
    with autocast_context(device, dtype):
        loss = trainer.objective(cond)
    loss.backward()
    seconds = time.perf_counter() - start
    result = {
        "trainable": trainable,
        "loss": float(loss.detach()),
        "step_s": seconds,
        "conditioning_s": conditioned - start,
        "peak_rss_gb": rss.peak(),
        "gradients": gradient_coverage(model),
        "frozen_released": not args.keep_frozen,
    }
    del trainer, cond, loss
    return result


def plan_figures(root: Path, stage: str, args, config, text_tokens: int, frozen_kept: bool) -> dict:
    """``easyref plan``'s estimate for this run: one process, batch 1, bf16 weights (gradients and AdamW moments in
    bf16 too); stage 2 runs no optimizer step and, unless kept, without the frozen parts."""
    from easyref.plan import make_plan

    plan = make_plan(
        str(root),
        stage,
        1,
        1,
        args.resolution,
        args.references,
        reference_side(config),
        gradient_checkpointing=args.gradient_checkpointing,
        compare_aggregation=False,
        num_tokens=config.num_tokens,
        param_dtype=torch.bfloat16,
        text_tokens=text_tokens,
    )
    terms = {k: v for k, v in plan.memory_gb.items() if k != "total"}
    if stage == "single_ref":
        terms["optimizer"] = 0.0
        if not frozen_kept:
            terms["frozen_vae_text"] = 0.0
    return {
        "terms_gb": terms,
        "total_gb": sum(terms.values()),
        "params": plan.params,
        "trainable": plan.trainable,
        "context_tokens": plan.context_tokens,
        "ip_layers": plan.ip_layers,
    }


def structure(model, processor, batch, config) -> dict:
    from easyref.model import adapter_processors

    encoder = model.reference_encoder
    inputs = processor(batch["references"], batch["caption"])
    ids = inputs["input_ids"][0]
    visual = int((ids == processor.image_token_id).sum())
    return {
        "trunk_layers": len(encoder.mllm.language_model.layers),
        "head_layers": len(encoder.head),
        "mrope_section": (getattr(encoder.text_config, "rope_parameters", None) or {}).get("mrope_section"),
        "ip_layers": len(adapter_processors(model.unet)),
        "context_tokens": int(ids.shape[0]),
        "visual_tokens": visual,
        "text_tokens": int(ids.shape[0]) - visual,
        "num_tokens": config.num_tokens,
    }


def _import_libraries() -> None:
    """Import what building and training load, so the RSS taken before the build is the libraries' own."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, Qwen2VLForConditionalGeneration  # noqa: F401

    import easyref.train.loop  # noqa: F401


def build(args: argparse.Namespace, tiny: Path, rss: Rss) -> tuple:
    real = args.profile == "real"
    _import_libraries()
    root = REAL_CONFIGS if real else Path(args.profile)
    config = profile_model_config(real)
    torch.manual_seed(0)
    baseline = rss.current()
    start = time.perf_counter()
    arch, base = random_base_models(root, tiny, config, "cpu", torch.bfloat16)
    model = build_easyref(root, config, "cpu", torch.bfloat16, unet=arch.unet, mllm=arch.mllm)
    arch.unet = arch.mllm = None  # the model holds them
    return root, config, arch, base, model, {"baseline_rss_gb": baseline, "build_s": time.perf_counter() - start}


def measure(args: argparse.Namespace, tiny: Path, tmp: Path) -> dict:
    from easyref.threads import configure_cpu_threads

    threads = configure_cpu_threads(threads=args.threads, device="cpu")
    rss = Rss()
    root, config, arch, base, model, memory = build(args, tiny, rss)
    memory["after_build_rss_gb"] = rss.current()
    batch = sample_batch(base.processor, args.resolution, args.references, reference_side(config))
    report = {
        "profile": args.profile,
        "dtype": "bfloat16",
        "resolution": args.resolution,
        "references": args.references,
        "reference_side": reference_side(config),
        "batch": 1,
        "threads": threads,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.lora_rank,
        "structure": structure(model, base.processor, batch, config),
        "memory": memory,
        "stages": {},
    }
    if "pretrain" in args.stages:
        report["stages"]["pretrain"] = run_pretrain(model, base, batch, args, rss, tmp)
        print(f"pretrain: {report['stages']['pretrain']}", flush=True)
    if "single_ref" in args.stages:
        report["stages"]["single_ref"] = run_single_ref(model, base, arch, batch, args, rss, tmp)
        print(f"single_ref: {report['stages']['single_ref']}", flush=True)
        report["structure"]["lora_layers"] = sum(1 for name, _ in model.unet.named_modules() if name.endswith("lora_A"))
    counts, _ = part_counts(model, arch.vae, (arch.text_encoder, arch.text_encoder_2))
    report["params"] = counts
    report["memory"]["lifetime_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    if args.out:  # the measurements, before the plan (a minute or more at the real size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plan:
        del model, arch, base
        text_tokens = report["structure"]["text_tokens"]
        for stage, result in report["stages"].items():
            kept = stage == "pretrain" or args.keep_frozen
            plan = plan_figures(root, stage, args, config, text_tokens, kept)
            above = result["peak_rss_gb"] - memory["baseline_rss_gb"]
            result["plan"] = plan
            result["above_baseline_gb"] = above
            result["measured_over_plan"] = above / plan["total_gb"]
            result["within_tolerance"] = abs(above / plan["total_gb"] - 1) <= TOLERANCE
        report["tolerance"] = TOLERANCE
        last = report["stages"][args.stages[-1]]["plan"]  # the model as it ended (with LoRA after stage 2)
        report["params_match_plan"] = counts == last["params"]
    return report


def format_report(report: dict) -> str:
    plans = [r["plan"]["params"] for r in report["stages"].values() if "plan" in r]
    plan_params = plans[-1] if plans else {}
    real = report["profile"] == "real"
    lines = [f"{'part':<16}{'params (M)':>12}{'plan (M)':>12}{'paper (M)':>12}"]
    for part, n in report["params"].items():
        planned = f"{plan_params[part] / 1e6:.1f}" if part in plan_params else "-"
        paper = f"{PAPER_M[part]:.1f}" if real and part in PAPER_M else "-"
        lines.append(f"{part:<16}{n / 1e6:>12.1f}{planned:>12}{paper:>12}")
    s = report["structure"]
    lines += [
        "",
        f"MLLM: {s['trunk_layers']} trunk + {s['head_layers']} head decoder layer(s), M-RoPE sections "
        f"{s['mrope_section']}, context {s['context_tokens']} tokens ({s['visual_tokens']} visual) + {s['num_tokens']} "
        f"reference tokens; IP layers {s['ip_layers']}; LoRA layers {s.get('lora_layers', '-')}",
        f"threads {report['threads']}, {report['resolution']}^2 px, {report['references']} reference(s), bf16, "
        f"build {report['memory']['build_s']:.0f} s, RSS before build {report['memory']['baseline_rss_gb']:.2f} GB, "
        f"after {report['memory']['after_build_rss_gb']:.2f} GB",
        "",
        f"{'stage':<12}{'step (s)':>10}{'loss':>10}{'peak RSS':>10}{'above base':>12}{'plan':>8}{'ratio':>8}",
    ]
    for stage, r in report["stages"].items():
        plan = r.get("plan")
        tail = f"{plan['total_gb']:>8.2f}{r['measured_over_plan']:>8.2f}" if plan else f"{'-':>8}{'-':>8}"
        above = r.get("above_baseline_gb", r["peak_rss_gb"] - report["memory"]["baseline_rss_gb"])
        lines.append(f"{stage:<12}{r['step_s']:>10.1f}{r['loss']:>10.4f}{r['peak_rss_gb']:>10.2f}{above:>12.2f}{tail}")
    if "params_match_plan" in report:
        lines.insert(
            len(report["params"]) + 1, f"equal to the plan's meta-device counts: {report['params_match_plan']}"
        )
    if "tolerance" in report:
        lines.append(f"(memory in GB; ratio = above base / plan, stated tolerance +-{report['tolerance']:.0%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tiny = args.tiny
        if tiny is None:
            from easyref.tiny_models import write_tiny_models

            tiny = write_tiny_models(tmp / "tiny", pretrained=False)
        report = measure(args, tiny, tmp)
    report["wall_s"] = time.perf_counter() - start
    print(format_report(report))
    losses = [r["loss"] for r in report["stages"].values()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not all(math.isfinite(x) for x in losses):
        print(f"error: a loss is not finite: {losses}", file=sys.stderr)
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
