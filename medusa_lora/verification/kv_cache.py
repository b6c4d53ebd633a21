"""Keeping the KV cache compact: after verification only the prefix and the accepted path stay.

``compact_cache`` / ``truncate_cache`` work on transformers' ``DynamicCache``; ``StaticKVCache`` is the
fixed-size cache of the static forward (``verification.forward``), written at positions the step gives.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import StaticLayer

from medusa_lora.kernels import compact_kv


def compact_cache(cache: DynamicCache, prefix_len: int, accepted: torch.Tensor) -> None:
    """Move the accepted tree rows to just after the prefix in every layer, then drop the rest.

    ``accepted`` holds tree node indices from the root down (strictly increasing, starting at 0);
    rows ``prefix_len + accepted[i]`` move to ``prefix_len + i``. Nothing is recomputed.
    """
    _compact(cache, prefix_len, accepted)
    truncate_cache(cache, prefix_len + len(accepted))


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of every layer (views, no copies)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]
        if hasattr(layer, "cumulative_length"):  # sliding-window layers (generate stays inside the window)
            layer.cumulative_length = length


def _compact(cache: Cache, prefix_len: int, accepted: torch.Tensor) -> None:
    """Rows ``prefix_len + accepted[i]`` -> ``prefix_len + i`` in every layer of ``cache``, in place."""
    if int(accepted[-1]) != len(accepted) - 1:  # a chain along the first nodes is already in place
        layers = cache.layers
        compact_kv([layer.keys for layer in layers], [layer.values for layer in layers], prefix_len, accepted)


class _PositionedLayer(StaticLayer):
    """A static layer that writes a step's keys and values at its cache's ``write_positions``; allocated on the
    first write, like transformers' own (whose ``lazy_initialization`` signature varies across versions)."""

    def __init__(self, max_cache_len: int, owner: StaticKVCache) -> None:
        super().__init__(max_cache_len)
        self.owner = owner
        self.allocated = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.allocated:
            batch, heads = key_states.shape[:2]
            self.keys = key_states.new_zeros(batch, heads, self.max_cache_len, key_states.shape[-1])
            self.values = value_states.new_zeros(batch, heads, self.max_cache_len, value_states.shape[-1])
            self.allocated = self.is_initialized = True
        self.keys.index_copy_(2, self.owner.write_positions, key_states)
        self.values.index_copy_(2, self.owner.write_positions, value_states)
        return self.keys, self.values


class StaticKVCache(Cache):
    """``num_layers`` layers of (B, KV heads, ``capacity``, D), allocated on the first write (the keys' device
    and dtype). A step sets ``write_positions`` (T,) before its forward; every layer returns its whole tensors,
    and the step's mask hides the positions past the prefix and the step. Its length is the caller's to track."""

    def __init__(self, capacity: int, num_layers: int) -> None:
        super().__init__(layers=[_PositionedLayer(capacity, self) for _ in range(num_layers)])
        self.write_positions: torch.Tensor | None = None

    def keep(self, prefix_len: int, accepted: torch.Tensor) -> None:
        """Move rows ``prefix_len + accepted[i]`` to ``prefix_len + i`` (what follows is stale, and masked)."""
        _compact(self, prefix_len, accepted)
