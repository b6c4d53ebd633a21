"""Backend choice: Triton kernels on CUDA when triton is installed, the CPU extension's kernels on a CPU where it
builds (tree attention; compaction has no CPU kernel: the reference runs), torch references otherwise.

`MEDUSA_LORA_KERNELS=reference|triton|cpu` forces a backend (unset or empty: automatic). Forcing "triton" for
CPU tensors works only in the Triton interpreter (`TRITON_INTERPRET=1` set before triton is first imported).
"""

from __future__ import annotations

import os

import torch

from ._cpu import extension as cpu_extension
from ._triton import HAS_TRITON
from .compact_kv import compact_kv_reference, compact_kv_triton
from .tree_attention import tree_attention_cpu, tree_attention_reference, tree_attention_triton

ENV_VAR = "MEDUSA_LORA_KERNELS"
BACKENDS = ("reference", "triton", "cpu")


def kernel_backend(device: torch.device | str | None = None) -> str:
    """Return "triton", "cpu" or "reference": the env var if set, else triton iff installed and CUDA is usable,
    else cpu for a CPU `device` where the CPU extension builds (`_cpu`), else reference.

    With `device`, "usable" means `device` is a CUDA device; without, that CUDA is available at all.
    """
    forced = os.environ.get(ENV_VAR, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is invalid; allowed values: {', '.join(BACKENDS)}")
        return forced
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if HAS_TRITON and on_cuda:
        return "triton"
    if device is not None and torch.device(device).type == "cpu" and cpu_extension() is not None:
        return "cpu"
    return "reference"


def tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_bits: torch.Tensor, scale: float
) -> torch.Tensor:
    """Tree attention (see `tree_attention_reference` for the contract) on the backend for q's device."""
    impl = {"triton": tree_attention_triton, "cpu": tree_attention_cpu}.get(
        kernel_backend(q.device), tree_attention_reference
    )
    return impl(q, k, v, tree_bits, scale)


def compact_kv(
    keys: list[torch.Tensor], values: list[torch.Tensor], prefix_len: int, accepted: torch.Tensor
) -> None:
    """In-place KV compaction (see `compact_kv_reference`) on the backend for the caches' device."""
    device = keys[0].device if keys else None
    impl = compact_kv_triton if kernel_backend(device) == "triton" else compact_kv_reference
    impl(keys, values, prefix_len, accepted)
