"""A LoRA's update added in place, ``y += (x A^T) B^T``, with every output one fixed-order dot product (the CPU
extension, ``csrc/lora_add.cpp``): a row's result does not depend on how many rows the call has.

Why: beside low-bit weights the update stays unmerged, and the activations downstream are rounded to 8 bits
(``lowbit_matmul``); BLAS's shape-dependent last bits could move a code between a tree step and one-token steps.
``lora_add_many_`` takes the layers that read the same x (a layer's q / k / v) in one call, with the bits of one
call each. ``lora_add_reference`` is two ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._cpu import extension

Update = tuple[torch.Tensor, torch.Tensor]  # (A (r, K), B (N, r)), the LoRA's scaling folded into B


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y`` (..., N) += (x (..., K) A^T) B^T with A (r, K), B (N, r) (its scaling folded in); returns y."""
    return lora_add_many_([y], x, [[(a, b)]])[0]


def lora_add_many_(
    ys: Sequence[torch.Tensor], x: torch.Tensor, updates: Sequence[Sequence[Update]]
) -> Sequence[torch.Tensor]:
    """``ys[l]`` (..., N_l) += (x A^T) B^T for each (A, B) of ``updates[l]`` in order, in place; returns ys. The
    kernel where it applies (fp32 on a CPU with the extension, contiguous outputs), else ``lora_add_reference``."""
    if len(ys) != len(updates):
        raise ValueError(f"{len(ys)} outputs but {len(updates)} lists of updates")
    module = extension()
    tensors = [x, *ys, *(t for per_y in updates for pair in per_y for t in pair)]
    usable = module is not None and x.device.type == "cpu" and all(y.is_contiguous() for y in ys)
    if not usable or not all(t.dtype == torch.float32 for t in tensors):
        for y, per_y in zip(ys, updates, strict=True):
            for a, b in per_y:
                lora_add_reference(y, x, a, b)
        return ys
    pairs = [(owner, pair) for owner, per_y in enumerate(updates) for pair in per_y]
    module.lora_add_(
        [y.view(-1, y.shape[-1]) for y in ys],
        x.reshape(-1, x.shape[-1]).contiguous(),
        [a for _, (a, _) in pairs],
        [b for _, (_, b) in pairs],
        [owner for owner, _ in pairs],
    )
    return ys


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return y.add_(F.linear(F.linear(x, a), b))
