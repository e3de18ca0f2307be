"""``easyref pretrain-tiny PART``: pretrain one of the tiny profile's parts offline and package it.

Each part is trained from the random tiny model of its architecture on demo-style images drawn with other seeds
than the demo's, checked (what it must be able to do, recorded in its manifest) and written to
``src/easyref/assets/tiny_PART/`` with ``pretrain.json`` (settings, data, code fingerprint, seconds, file hashes).
``easyref tiny-models`` then installs the packaged parts over the random ones. Order matters where parts depend on
each other: ``ip_adapter`` is trained on the packaged ``sdxl`` base with the packaged ``ip_clip`` encoder, so
re-make it after either. Each part takes minutes to an hour of one CPU core.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "pretrain a tiny part (clip, dino, ip_clip, mllm, ip_adapter) offline and package it"

# part -> the module that pretrains it (its add_arguments, run and fingerprint)
PARTS: dict[str, str] = {
    "clip": "easyref.tiny.judges",
    "dino": "easyref.tiny.judges",
    "ip_clip": "easyref.tiny.judges",
    "mllm": "easyref.tiny.mllm",
    "ip_adapter": "easyref.tiny.ip_adapter",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="part", metavar="PART", required=True)
    for part, module_name in PARTS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(part, help=f"pretrain the tiny {part}", description=(module.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_part_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._part_run(args) or 0)
