"""``easyref register``: arguments and the printed report (the report's lines are read by people and the pipeline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from easyref.registry.config import RegisterConfig, check_model_name
from easyref.registry.gate import CHALLENGER, CHAMPION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained EasyRef checkpoint folder")
    parser.add_argument(
        "--metrics",
        type=Path,
        required=True,
        help="metrics.json written by easyref evaluate (its evaluation.json must name this checkpoint's sha256)",
    )
    parser.add_argument("--model-name", help="registered model name (default: register.model_name, 'easyref')")
    parser.add_argument(
        "--base",
        type=Path,
        default=Path("models/tiny"),
        help="base models (sdxl/, mllm/), bundled with the model unless register.base_models names them "
        "(default: models/tiny)",
    )
    parser.add_argument("--promote", action="store_true", help="move @champion here if the gate passes")
    parser.add_argument("--params", type=Path, help="read the 'register' section of this params.yaml")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def config_from_args(args: argparse.Namespace) -> RegisterConfig:
    from easyref.config import load_section
    from easyref.errors import UserError

    if args.model_name is not None:
        try:
            check_model_name(args.model_name)
        except ValueError as exc:
            raise UserError(f"--model-name: {exc}") from None
    return load_section(RegisterConfig, args.params, "register", {"model_name": args.model_name})


def run(args: argparse.Namespace) -> int:
    from easyref.registry.store import register

    config = config_from_args(args)
    result = register(
        args.checkpoint,
        args.metrics,
        config,
        base=args.base,
        params_file=args.params,
        promote_=args.promote,
        tracking_uri=args.tracking_uri,
    )
    name = config.model_name
    print(
        f"{name} v{result.version}: {'registered' if result.created else 'already registered (same checkpoint)'}; "
        f"@{CHALLENGER} -> v{result.version}"
    )
    if result.promoted is not None:
        for line in result.lines:
            print(f"  {line.describe()}")
        print(f"gate: {result.decision}" + (f"; @{CHAMPION} -> v{result.version}" if result.promoted else ""))
    return 0
