"""``medusa-lora train`` (and ``python -m medusa_lora.training`` for accelerate / torchrun): train from a YAML
config with overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medusa_lora.errors import MedusaLoraError
from medusa_lora.training.config import load_config
from medusa_lora.training.loop import train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-lora train",
        description="Train Medusa heads jointly with a task LoRA (or either alone). Launch with "
        "`accelerate launch -m medusa_lora.training ...` or torchrun for several processes.",
    )
    parser.add_argument("--config", help="YAML file of TrainConfig keys (see training/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; the value is parsed as YAML (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in output_dir (start afresh if there is none)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, print the model directory; 2 on a configuration or data error."""
    args = build_parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # set by torchrun / accelerate launch
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        model_dir = train(load_config(args.config, args.overrides), resume=args.resume)
    except MedusaLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if main_process:
        print(model_dir)
    return 0
