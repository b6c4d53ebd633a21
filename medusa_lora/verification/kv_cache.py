"""Keeping the KV cache compact: after verification only the prefix and the accepted path stay."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from medusa_lora.kernels import compact_kv


def compact_cache(cache: DynamicCache, prefix_len: int, accepted: torch.Tensor) -> None:
    """Move the accepted tree rows to just after the prefix in every layer, then drop the rest.

    ``accepted`` holds tree node indices from the root down (strictly increasing, starting at 0);
    rows ``prefix_len + accepted[i]`` move to ``prefix_len + i``. Nothing is recomputed.
    """
    length = len(accepted)
    if int(accepted[-1]) != length - 1:  # a chain along the first nodes is already in place
        compact_kv(
            [layer.keys for layer in cache.layers],
            [layer.values for layer in cache.layers],
            prefix_len,
            accepted,
        )
    truncate_cache(cache, prefix_len + length)


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer (views, no copies)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]
        if hasattr(layer, "cumulative_length"):  # sliding-window layers (generate stays inside the window)
            layer.cumulative_length = length
