"""The ``easyref evaluate`` command: arguments, the config they give, and the evaluation itself."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from easyref.evaluate.config import SWAPPED, TEXT, EvaluateConfig
from easyref.evaluate.generation import generate_easyref
from easyref.evaluate.outputs import log_to_mlflow, write_outputs
from easyref.evaluate.reference_gain import partners, reference_gain
from easyref.evaluate.samples import ImageStore, Sample, load_dreambench, load_split
from easyref.evaluate.scoring import score, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from easyref.evaluate.baselines import baseline_names

    parser.add_argument("--checkpoint", type=Path, required=True, help="trained EasyRef checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", type=Path, help="held_in.parquet or held_out.parquet written by easyref split")
    source.add_argument(
        "--dreambench", type=Path, metavar="DIR", help="a DreamBench folder (<subject>/*.jpg + prompts_and_classes.txt)"
    )
    parser.add_argument(
        "--images-root", type=Path, help="folder the split's image paths are relative to (default: from split.json)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--baseline",
        action="append",
        choices=baseline_names(),
        default=None,
        help="also evaluate this baseline (repeatable; default: evaluate.baselines of --params)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="evaluate the checkpoint only")
    parser.add_argument(
        "--base",
        type=Path,
        default=Path("models/tiny"),
        help="folder holding the base models sdxl/ and mllm/ (default: models/tiny)",
    )
    parser.add_argument("--params", type=Path, help="read the 'evaluate' section of this params.yaml")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 30)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance weight (default 7.5)")
    parser.add_argument("--seed", type=int, help="base seed of the per-sample seeds (default 0)")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, help="samples per sampler call (default 4)")
    parser.add_argument("--no-reference-gain", action="store_true", help="skip the reference-gain check")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """The ``evaluate`` section of ``--params`` (if given) with the flags that were set applied on top."""
    from easyref.config import load_section

    baselines = [] if args.no_baselines else list(dict.fromkeys(args.baseline)) if args.baseline else None
    flags = {
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "max_samples": args.max_samples,
        "batch_size": args.batch_size,
        "baselines": baselines,
    }
    config = load_section(EvaluateConfig, args.params, "evaluate", flags)
    if args.no_reference_gain:
        config = dataclasses.replace(config, reference_gain=dataclasses.replace(config.reference_gain, enabled=False))
    return config


def with_base_defaults(config: EvaluateConfig, base: Path) -> EvaluateConfig:
    """Fill model locations left unset (None) from the base-model folder: clip/, dino/, ip_adapter/."""
    metrics = dataclasses.replace(
        config.metrics, clip=config.metrics.clip or str(base / "clip"), dino=config.metrics.dino or str(base / "dino")
    )
    ip_adapter = dataclasses.replace(config.ip_adapter, path=config.ip_adapter.path or str(base / "ip_adapter"))
    return dataclasses.replace(config, metrics=metrics, ip_adapter=ip_adapter)


def evaluate(
    checkpoint: Path,
    samples: Sequence[Sample],
    out: Path,
    base: Path,
    config: EvaluateConfig,
    info: dict[str, Any],
    device: str,
    tracking_uri: str | None = None,
) -> dict[str, float | None]:
    """Generate, score and report ``samples`` for the checkpoint and the configured baselines."""
    import gc

    import pandas as pd
    import torch

    from easyref.evaluate.baselines import load_baseline
    from easyref.sampler import EasyRefSampler, base_paths

    sdxl, mllm = base_paths(base)
    config = with_base_defaults(config, base)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    store = ImageStore()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}  # generation (and any tuning) time of each method
    tuning: dict[str, float] = {}

    sampler = EasyRefSampler.from_pretrained(sdxl, mllm, checkpoint=checkpoint, device=device, torch_dtype=dtype)
    with sampler.reuse_references():  # each (group, caption) through the MLLM once: the gain reuses both methods'
        begin = time.perf_counter()
        generated = {"easyref": generate_easyref(sampler, samples, store, config)}
        seconds["easyref"] = time.perf_counter() - begin
        others = partners(samples)
        if config.swapped_references and all(j is not None for j in others):
            swapped = [samples[j].references for j in others if j is not None]
            generated[SWAPPED] = generate_easyref(sampler, samples, store, config, references=swapped)
        gains = reference_gain(sampler, samples, store, sdxl, config) if config.reference_gain.enabled else None
        if TEXT in config.baselines:
            begin = time.perf_counter()
            generated[TEXT] = generate_easyref(sampler, samples, store, config, text_only=True)
            seconds[TEXT] = time.perf_counter() - begin
    del sampler
    gc.collect()
    for name in config.baselines:
        if name == TEXT:
            continue
        baseline = load_baseline(name, sdxl, config, device, dtype)
        begin = time.perf_counter()
        generated[name] = baseline(samples, store, config)
        seconds[name] = time.perf_counter() - begin
        if tuned := getattr(baseline, "tuning_seconds", None):  # tuning-based baselines: the tuning part alone
            tuning[name] = round(sum(tuned.values()) / len(tuned), 3)
        del baseline
        gc.collect()
    groups = len({s.group for s in samples})
    per_group = {method: round(s / groups, 3) for method, s in seconds.items()}

    table = score(samples, generated, store, config, out / ".cache" / "target_embeddings.safetensors", device)
    if gains is not None:
        gain_frame = pd.DataFrame(gains).assign(method="easyref", sample_id=[s.sample_id for s in samples])
        table = table.merge(gain_frame, on=["method", "sample_id"], how="left")
    summary = summarize(table, config.confidence, config.caption_subsets)
    info = {
        **({"note": config.report_note} if config.report_note else {}),
        **info,
        "num_samples": len(samples),
        "methods": ", ".join(generated),
        "steps": config.steps,
        "guidance": config.guidance,
        "seconds": round(time.perf_counter() - started, 1),
        "num_groups": groups,
        **{f"seconds_per_group.{method}": s for method, s in per_group.items()},
        **{f"tuning_seconds_per_group.{method}": s for method, s in tuning.items()},
    }
    metrics = write_outputs(out, samples, generated, table, summary, info, store, config, per_group)
    run_id = log_to_mlflow(out, metrics, config, info, tracking_uri)
    print(f"logged to MLflow run {run_id}")
    return metrics


def run(args: argparse.Namespace) -> int:
    import torch

    from easyref.data.parquet import sha256_file
    from easyref.model import read_checkpoint_config
    from easyref.registry import checkpoint_sha256, git_commit
    from easyref.threads import configure_cpu_threads

    configure_cpu_threads()

    config = config_from_args(args)
    model = read_checkpoint_config(args.checkpoint).model  # a clear error before anything is loaded
    if args.split is not None:
        samples = load_split(args.split, args.images_root, config.seed)
        info: dict[str, Any] = {"split": str(args.split), "split_sha256": sha256_file(args.split)}
    else:
        samples = load_dreambench(args.dreambench, config.dreambench, config.seed)
        info = {"dreambench": str(args.dreambench)}
    if config.max_samples is not None:
        samples = samples[: config.max_samples]
    info = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
        **info,
        # the variant evaluated (what `easyref compare` labels its rows with)
        "model.aggregation": model.aggregation,
        "model.num_tokens": model.num_tokens,
        "model.insertion_layer": model.insertion_layer,
        "git_commit": git_commit(),
    }
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(args.checkpoint, samples, args.out, args.base, config, info, device, args.tracking_uri)
    for key in sorted(k for k in metrics if k.count(".") == 1):
        print(f"{key:28s} {metrics[key]}")
    print(f"report: {args.out / 'report.html'}")
    return 0
