"""Train one EasyRef stage: pretrain -> single_ref -> multi_ref (the paper's three progressive stages).

The same command runs as a plain process, under torchrun / torchx, and in a cluster job (it reads RANK,
WORLD_SIZE and LOCAL_RANK). Settings come from params.yaml's train: section (shared keys, then the stage's
sub-mapping), then these flags. A run resumes from the newest intact checkpoint in --out automatically, if its
settings are this run's (else it refuses, unless --allow-config-change); the stage's result is written to
OUT/final, the folder the next stage's --init and `easyref generate --checkpoint` take. One run per --out at a time:
a second is refused, naming the first.

  easyref train --stage pretrain --params params.yaml --out runs/pretrain
  easyref train --stage single_ref --init runs/pretrain/final --out runs/single_ref
  torchrun --nproc_per_node 2 -m easyref.cli train --stage pretrain --out runs/pretrain
  torchx run -s local_cwd dist.ddp -j 1x2 -m easyref.cli -- train --stage pretrain --out runs/pretrain
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from easyref.train.config import STAGES

HELP = "train one EasyRef stage (pretrain, single_ref, multi_ref), distributed and resumable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, required=True, help="the training stage")
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="parameters file with a train: section (default: params.yaml if present)",
    )
    parser.add_argument("--init", type=Path, default=None, help="checkpoint of the previous stage (its OUT/final)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints/ and final/")
    on_change = parser.add_mutually_exclusive_group()
    on_change.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a checkpoint although settings (seed, lr, batch, data, ...) changed: prints each change and "
        "applies the new values (default: refuse)",
    )
    on_change.add_argument(
        "--restart-on-config-change",
        action="store_true",
        help="when the checkpoints in --out were made with other settings, set them and OUT/final aside "
        "(OUT/superseded/<time>/) and start at step 0 instead of refusing; what a DVC stage wants after a params.yaml "
        "edit",
    )
    group = parser.add_argument_group("overrides of params.yaml")
    group.add_argument("--base", help="folder with the base models sdxl/ and mllm/")
    group.add_argument(
        "--data",
        help="training data: split table (.parquet), packed shards (folder or s3:// prefix, easyref pack) or folder "
        "of groups",
    )
    group.add_argument("--image-root", dest="image_root", help="folder the split table's image paths are relative to")
    group.add_argument("--preview-data", dest="preview_data", help="samples for the preview grids")
    group.add_argument("--max-steps", dest="max_steps", type=int)
    group.add_argument("--batch-size", dest="batch_size", type=int, help="samples per device per micro-step")
    group.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-steps per optimizer step")
    group.add_argument("--lr", type=float)
    group.add_argument("--resolution", type=int, help="training image side in pixels")
    group.add_argument("--save-every", dest="save_every", type=int)
    group.add_argument("--keep-last", dest="keep_last", type=int)
    group.add_argument("--preview-every", dest="preview_every", type=int)
    group.add_argument("--preview-steps", dest="preview_steps", type=int)
    group.add_argument("--mixed-precision", dest="mixed_precision", choices=["auto", "no", "bf16"])
    group.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    group.add_argument("--fsdp", action="store_true", default=None, help="shard with FSDP2 instead of DDP")
    group.add_argument("--seed", type=int)
    group.add_argument("--noise-offset", dest="noise_offset", type=float,
                       help="offset noise: one normal draw per sample and latent channel times this (0 = off)")
    group.add_argument("--num-workers", dest="num_workers", type=int)
    group.add_argument("--cache-dir", dest="cache_dir", help="conditioning cache folder (empty: off)")
    group.add_argument(
        "--compile-unet", dest="compile_unet", action="store_true", default=None, help="torch.compile the UNet"
    )
    group.add_argument(
        "--compile-backend", dest="compile_backend", help="its backend (default inductor; aot_eager: capture only)"
    )
    group.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: cores / local processes; or $EASYREF_THREADS, $OMP_NUM_THREADS)",
    )


def run(args: argparse.Namespace) -> int:
    import faulthandler
    import io
    import signal

    from easyref.threads import configure_cpu_threads
    from easyref.train.config import load_train_config

    configure_cpu_threads(threads=args.threads)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):  # stderr without a file
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints where a hung rank waits
    from easyref.train.loop import train

    params = args.params
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    config = load_train_config(params, args.stage, vars(args))
    train(
        config,
        out=args.out,
        init=args.init,
        allow_config_change=args.allow_config_change,
        restart_on_config_change=args.restart_on_config_change,
    )
    return 0
