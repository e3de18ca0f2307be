"""The ``easyref`` command line: one sub-command per step, each a thin shell around the library.

Every command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs (or when ``--help`` lists them), and they import torch lazily, so the CLI
starts quickly.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from easyref.errors import UserError

# command name -> module implementing it
COMMANDS: dict[str, str] = {
    "tiny-models": "easyref.tiny_models",
    "generate": "easyref.generate",
    "demo-data": "easyref.data.demo",
    "ingest": "easyref.data.ingest",
    "split": "easyref.data.split",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyref",
        description="EasyRef: train, evaluate and serve SDXL conditioned on a group of reference images.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=doc or module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # expected, user-facing failures: no traceback
        print(f"easyref {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
