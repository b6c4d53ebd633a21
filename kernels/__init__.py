"""Kernels for Medusa tree verification: tree attention and in-place KV-cache compaction; and weight-only int8 /
int4 linear layers (``quantized_linear``: torch's CPU kernels, each beside its reference).

Each op has a torch reference and a Triton kernel; `tree_attention` and `compact_kv` pick one through
`kernel_backend()` (override with MEDUSA_LORA_KERNELS=reference|triton). Importing this package never
requires triton.
"""

from .compact_kv import compact_kv_reference
from .dispatch import compact_kv, kernel_backend, tree_attention
from .tree_attention import pack_tree_mask, tree_attention_reference, unpack_tree_mask

__all__ = [
    "compact_kv",
    "compact_kv_reference",
    "kernel_backend",
    "pack_tree_mask",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_mask",
]
