"""``medusa-lora serve``: task adapters, each with its own Medusa heads, on one base model behind an
OpenAI-compatible API (``medusa_lora.serving``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medusa_lora.cli.options import (
    DTYPE_NAMES,
    add_fast_path_option,
    add_tree_option,
    apply_fast_path_option,
    torch_dtype,
)
from medusa_lora.errors import ConfigError


def _adapter(value: str) -> tuple[str, Path]:
    name, sep, directory = value.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(directory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="medusa-lora serve",
        description="Serve task adapters, each with its own Medusa heads, on one base model behind an "
        "OpenAI-compatible API. Requests run one at a time from a bounded queue (no batching).",
    )
    parser.add_argument("--model", default="smollm2-135m", help="base model: smollm2-135m, a dir or a hub id")
    parser.add_argument(
        "--adapter",
        type=_adapter,
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a medusa-lora dir (LoRA + heads, or heads only) served as model NAME; repeat for more",
    )
    parser.add_argument(
        "--base-name", help="the model name requests use for the base alone (default: --model)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--queue-size", type=int, default=16, help="requests that may wait (429 beyond)")
    add_tree_option(parser, "calibrated", "each adapter's tree")
    add_fast_path_option(parser)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    apply_fast_path_option(args)
    names = [name for name, _ in args.adapter]
    base_name = args.base_name or args.model
    duplicates = sorted({n for n in names if names.count(n) > 1} | ({base_name} & set(names)))
    if duplicates:
        raise ConfigError(f"adapter names must be unique and differ from the base model's: {duplicates}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from medusa_lora.model.inference import freeze_gc
    from medusa_lora.serving.app import create_app
    from medusa_lora.serving.registry import Registry

    registry = Registry.load(
        args.model, dict(args.adapter), torch_dtype(args.dtype), args.tree, served_base_name=base_name
    )
    freeze_gc()  # no full garbage collection pauses inside requests
    uvicorn.run(create_app(registry, args.queue_size), host=args.host, port=args.port)
    return 0
