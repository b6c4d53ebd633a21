"""A LoRA's update added in place, ``y += (x A^T) B^T``, with every output one fixed-order dot product (the CPU
extension, ``csrc/lora_add.cpp``): a row's result does not depend on how many rows the call has.

Why: beside low-bit weights the update stays unmerged, and the activations downstream are rounded to 8 bits
(``lowbit_matmul``); BLAS's shape-dependent last bits could move a code between a tree step and one-token steps.
``lora_add_reference`` is two ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._cpu import extension


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y`` (..., N) += (x (..., K) A^T) B^T with A (r, K), B (N, r) (its scaling folded in); returns y. The
    kernel where it applies (fp32 on a CPU with the extension), else ``lora_add_reference``."""
    module = extension()
    usable = module is not None and x.device.type == "cpu"
    if not usable or not all(t.dtype == torch.float32 for t in (y, x, a, b)) or not y.is_contiguous():
        return lora_add_reference(y, x, a, b)
    module.lora_add_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).contiguous(), a, b)
    return y


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return y.add_(F.linear(F.linear(x, a), b))
