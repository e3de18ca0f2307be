"""The ``easyref evaluate`` command: arguments, the config they give, and the evaluation itself."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from easyref.evaluate.config import SWAPPED, TEXT, EvaluateConfig
from easyref.evaluate.generation import generate_easyref
from easyref.evaluate.outputs import log_to_mlflow, write_outputs
from easyref.evaluate.paired import ordering_verdict, paired_summaries
from easyref.evaluate.reference_gain import partners, reference_gain
from easyref.evaluate.samples import ImageStore
from easyref.evaluate.scoring import load_embedders, per_sample, score, summarize
from easyref.evaluate.sections import HELD_OUT, Section, SectionRun, combine, load_sections, primary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from easyref.evaluate.baselines import baseline_names

    parser.add_argument("--checkpoint", type=Path, required=True, help="trained EasyRef checkpoint folder")
    parser.add_argument(
        "--split",
        type=Path,
        help="the folder `easyref split` wrote (evaluates held_in.parquet and held_out.parquet, one section each) "
        "or one of its files (that section only)",
    )
    parser.add_argument(
        "--dreambench",
        type=Path,
        metavar="DIR",
        help="a DreamBench folder (<subject>/*.jpg + prompts_and_classes.txt), one more section "
        "(default: evaluate.dreambench.folder of --params)",
    )
    parser.add_argument("--no-dreambench", action="store_true", help="skip evaluate.dreambench.folder of --params")
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
    parser.add_argument(
        "--reference-scale", type=float,
        help="scale of EasyRef's reference attention when generating (default 1 = as trained; 0 = off)",
    )
    parser.add_argument("--seed", type=int, help="base seed of the per-sample seeds (default 0)")
    parser.add_argument(
        "--max-samples", type=int, help="evaluate at most N samples of each section, from its groups in turn"
    )
    parser.add_argument(
        "--images-per-sample", type=int,
        help="images each method generates per sample, each with its own seed; a sample's metrics are their mean "
        "(default 1; more make the intervals less a matter of the sampler's noise, at that many times the time)",
    )
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
        "reference_scale": args.reference_scale,
        "seed": args.seed,
        "max_samples": args.max_samples,
        "images_per_sample": args.images_per_sample,
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
    sections: Sequence[Section],
    out: Path,
    base: Path,
    config: EvaluateConfig,
    info: dict[str, Any],
    device: str,
    tracking_uri: str | None = None,
) -> dict[str, float | None]:
    """Generate, score and report every section's samples for the checkpoint and the configured baselines."""
    import gc

    import pandas as pd
    import torch

    from easyref.base_models import BaseModels
    from easyref.captions import CaptionFit
    from easyref.evaluate.baselines import load_baseline
    from easyref.model import load_model
    from easyref.sampler import EasyRefSampler, base_paths

    sdxl, mllm = base_paths(base)
    config = with_base_defaults(config, base)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    store = ImageStore()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = [SectionRun(section) for section in sections]

    model = load_model(sdxl, mllm, checkpoint=checkpoint, torch_dtype=dtype)
    # loaded once: the checkpoint's sampler, the reference gain and every baseline share them
    base_models = BaseModels.load(sdxl, mllm, model.config, device=device, torch_dtype=dtype)
    sampler = EasyRefSampler(model, base_models).to(device)
    fit = CaptionFit.shared(sampler.pipe)
    captions = [s.caption for run in runs for s in run.section.first_draws]
    captions_cut = fit.count_long(captions)
    if captions_cut:
        print(
            f"captions: {captions_cut} of {len(captions)} samples' captions are longer than the text encoders' "
            f"{fit.limit} tokens; every method gets them cut at the last whole word that fits "
            f"(evaluation.json: captions_truncated)"
        )
    for run in runs:
        samples = run.section.samples
        with sampler.reuse_references():  # each (group, caption) through the MLLM once: the gain reuses both methods'
            run.timed("easyref", generate_easyref, sampler, samples, store, config)
            others = partners(samples)
            if config.swapped_references and all(j is not None for j in others):
                swapped = [samples[j].references for j in others if j is not None]
                run.generated[SWAPPED] = generate_easyref(sampler, samples, store, config, references=swapped)
            if config.reference_gain.enabled:
                run.gains = reference_gain(sampler, run.section.first_draws, store, config)
            if TEXT in config.baselines:
                run.timed(TEXT, partial(generate_easyref, text_only=True), sampler, samples, store, config)
    del sampler, model
    gc.collect()
    for name in config.baselines:
        if name == TEXT:
            continue
        baseline = load_baseline(name, base_models, config)
        for run in runs:
            run.timed(name, baseline, run.section.samples, store, config)
        del baseline
        gc.collect()

    embedders = load_embedders(config, device)
    cache = out / ".cache" / "target_embeddings.safetensors"
    tables, summaries = {}, {}
    for run in runs:
        table = score(run.section.samples, run.generated, store, config, cache, device, embedders)
        if run.gains is not None:
            ids = [s.sample_id for s in run.section.first_draws]
            gain_frame = pd.DataFrame(run.gains).assign(method="easyref", sample_id=ids, draw=0)
            table = table.merge(gain_frame, on=["method", "sample_id", "draw"], how="left")
        tables[run.name] = table
        samples = per_sample(table)
        summaries[run.name] = {
            **summarize(samples, config.confidence, config.caption_subsets),
            **paired_summaries(samples, config.confidence),
        }
    main = primary([run.name for run in runs])
    for run in runs:
        if run.name == HELD_OUT:
            print(ordering_verdict(summaries[run.name], pct=f"{config.confidence:.0%}").sentence)
    info = {
        **({"note": config.report_note} if config.report_note else {}),
        **info,
        "sections": ", ".join(run.name for run in runs),
        "primary_section": main,
        "methods": ", ".join(dict.fromkeys(m for run in runs for m in run.generated)),
        "steps": config.steps,
        "guidance": config.guidance,
        "reference_scale": config.reference_scale,
        "seconds": round(time.perf_counter() - started, 1),
        "captions_truncated": captions_cut,
        **combine({run.name: run.info() for run in runs}, main),
    }
    metrics, info = write_outputs(out, runs, tables, summaries, info, store, config)
    run_id = log_to_mlflow(out, metrics, config, info, tracking_uri)
    print(f"logged to MLflow run {run_id}")
    return metrics


def run(args: argparse.Namespace) -> int:
    import torch

    from easyref.model import read_checkpoint_config
    from easyref.registry import checkpoint_sha256, git_commit
    from easyref.threads import configure_cpu_threads

    configure_cpu_threads()

    config = config_from_args(args)
    folder = None if args.no_dreambench else args.dreambench or config.dreambench.folder
    sections = load_sections(args.split, Path(folder) if folder else None, args.images_root, config)
    model = read_checkpoint_config(args.checkpoint).model  # a clear error before anything is loaded
    info = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
        # the variant evaluated (what `easyref compare` labels its rows with)
        "model.aggregation": model.aggregation,
        "model.num_tokens": model.num_tokens,
        "model.insertion_layer": model.insertion_layer,
        "git_commit": git_commit(),
    }
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(args.checkpoint, sections, args.out, args.base, config, info, device, args.tracking_uri)
    for key in sorted(k for k in metrics if k.count(".") == 1):
        print(f"{key:28s} {metrics[key]}")
    print(f"report: {args.out / 'report.html'}")
    return 0
