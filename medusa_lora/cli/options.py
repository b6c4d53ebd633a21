"""argparse options the subcommands share."""

from __future__ import annotations

import argparse

from medusa_lora.errors import ConfigError
from medusa_lora.trees.choice import parse_tree_spec

DTYPE_NAMES = ("bf16", "fp32")


def tree_option(value: str) -> int | str:
    """A ``--tree`` value (a node count, ``auto`` or ``calibrated``: ``parse_tree_spec``), refused with its
    reason before any model loads."""
    try:
        return parse_tree_spec(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_TREE_HELP = (
    "calibrated: the tree saved at training; auto: the calibrated tree sized for this device by measuring "
    "step costs (once, at startup); N: a default tree of N nodes"
)


def add_tree_option(parser: argparse.ArgumentParser, default: str, subject: str = "the heads' tree") -> None:
    """Add ``--tree`` (``tree_option``'s values) to ``parser``; ``subject`` says whose tree it sets."""
    parser.add_argument(
        "--tree",
        type=tree_option,
        default=default,
        metavar="N|auto|calibrated",
        help=f"{subject}, default {default}. {_TREE_HELP}",
    )


WEIGHT_NAMES = ("int8", "int4")


def add_weights_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--weights`` (``for_inference``'s ``weights``)."""
    parser.add_argument(
        "--weights",
        choices=WEIGHT_NAMES,
        help="run the decoder's linear layers on int8 or int4 (groups of 32, as GGUF Q4_1) weights, the LM head "
        "in int8 and the LoRA unmerged beside them; activations keep --dtype: on a CPU use bf16, torch's low-bit "
        "kernels are slow under fp32 (default: the model's own weights)",
    )


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name in ``DTYPE_NAMES``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def add_fast_path_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--no-fast-path`` (``apply_fast_path_option`` acts on it)."""
    parser.add_argument(
        "--no-fast-path",
        action="store_true",
        help="run transformers' eager forward on a dynamic cache (default: on CUDA a static cache with one CUDA "
        "graph per step size, on a CPU the lean forward on the CPU kernels where it runs the model; also "
        "MEDUSA_LORA_FAST_PATH=0)",
    )


def apply_fast_path_option(args: argparse.Namespace) -> None:
    """``--no-fast-path`` for every ``generate()`` of this process: ``MEDUSA_LORA_FAST_PATH=0``."""
    import os

    from medusa_lora.verification.forward import ENV_VAR

    if args.no_fast_path:
        os.environ[ENV_VAR] = "0"
