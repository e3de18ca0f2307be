"""The ``easyref`` command line: one sub-command per step, each a thin shell around the library.

Every command module exposes ``HELP`` (one line, repeated in :data:`COMMANDS`), ``add_arguments(parser)`` and
``run(args) -> int``. Only the module of the command being run is imported, and modules import torch lazily, so
``easyref --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from easyref.errors import UserError

# command name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-models": ("easyref.tiny_models", "write the tiny SDXL / Qwen2-VL / CLIP / DINOv2 / IP-Adapter models"),
    "pretrain-base": ("easyref.tiny.base",
                      "pretrain the tiny SDXL base (VAE, then the UNet on frozen CLIP text towers) on demo data"),
    "pretrain-tiny": ("easyref.tiny.cli", "pretrain a tiny judge, MLLM or IP-Adapter offline and package it"),
    "demo-data": ("easyref.data.demo", "write the synthetic demo dataset of image groups"),
    "ingest": ("easyref.data.ingest", "ingest image sources into a manifest of groups (with rejections)"),
    "ingest-shard": ("easyref.data.ingest_shards", "ingest one shard of the images (one pod of a fanned-out ingest)"),
    "ingest-merge": ("easyref.data.ingest_merge", "merge the folders of ingest-shard into one ingest output"),
    "split": ("easyref.data.split", "split a manifest into train / held-in / held-out groups"),
    "pack": ("easyref.data.pack", "pack a split table's images into sequential training shards (folder or S3)"),
    "generate": ("easyref.generate", "generate images from a prompt and a group of reference images"),
    "evaluate": ("easyref.evaluate", "evaluate a checkpoint: CLIP-I / CLIP-T / DINO-I, reference gain, baselines"),
    "compare": ("easyref.evaluate.compare", "compare evaluations in the paper's table layout, beside its figures"),
    "register": ("easyref.registry", "register a checkpoint in the MLflow registry and promote it by alias"),
    "train": (
        "easyref.train.cli",
        "train one EasyRef stage (pretrain, single_ref, multi_ref), distributed and resumable",
    ),
    "launch": ("easyref.train.launch", "render or submit a Kubeflow Trainer TrainJob running `easyref train`"),
    "base-models": ("easyref.base_models", "download the real base models at pinned hub revisions (resumable)"),
    "plan": ("easyref.plan", "plan a stage: parameters, memory per GPU, fit on 80/141 GB cards, FLOPs per sample"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="easyref",
        description="EasyRef: train, evaluate and serve SDXL conditioned on a group of reference images.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_line) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_line,
            description=(module.__doc__ or help_line).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # expected, user-facing failures: the message says what to fix
        print(f"easyref {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
