"""argparse types the subcommands share."""

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


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name in ``DTYPE_NAMES``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
