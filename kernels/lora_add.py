"""A LoRA's update added in place, ``y += (x A^T) B^T``, every output one fixed sequence of operations (the CPU
extension, ``csrc/lora_add.cpp``: a dot product over K, then r multiply-adds in order, 16 outputs a vector): a
row's result does not depend on how many rows the call has or on how many threads share it.

Why: beside low-bit weights the update stays unmerged, and the activations downstream are rounded to 8 bits
(``lowbit_matmul``); BLAS's shape-dependent last bits could move a code between a tree step and one-token steps.
``lora_add_many_`` takes the layers that read the same x (a layer's q / k / v) in one call, with the bits of one
call each. B goes in as panels (``pack_b``: 16 outputs' r values contiguous), so the second product reads memory
in order and needs no horizontal sums. ``lora_add_reference`` is two matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._cpu import extension

PANEL = 16  # outputs a panel of B holds
# (A (r, K), pack_b(B) (ceil(N / 16), r, 16)): a LoRA's update, its scaling folded into B
Update = tuple[torch.Tensor, torch.Tensor]


def pack_b(b: torch.Tensor) -> torch.Tensor:
    """B (N, r) -> panels (ceil(N / 16), r, 16), ``panels[p, j, e] = B[16 p + e, j]``, zero past N."""
    n, r = b.shape
    padded = b.new_zeros(-(-n // PANEL) * PANEL, r)
    padded[:n] = b
    return padded.view(-1, PANEL, r).transpose(1, 2).contiguous()


def unpack_b(panels: torch.Tensor, n: int) -> torch.Tensor:
    """``pack_b``'s inverse: B (n, r)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:n]


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """``y`` (..., N) += (x (..., K) A^T) B^T with A (r, K), B (N, r) (the scaling folded in) as ``pack_b(B)``;
    returns y."""
    return lora_add_many_([y], x, [[(a, panels)]])[0]


def lora_add_many_(
    ys: Sequence[torch.Tensor], x: torch.Tensor, updates: Sequence[Sequence[Update]]
) -> Sequence[torch.Tensor]:
    """``ys[l]`` (..., N_l) += (x A^T) B^T for each (A, pack_b(B)) of ``updates[l]`` in order, in place; returns ys.
    The kernel where it applies (fp32 on a CPU with the extension, contiguous outputs), else
    ``lora_add_reference``."""
    if len(ys) != len(updates):
        raise ValueError(f"{len(ys)} outputs but {len(updates)} lists of updates")
    module = extension()
    tensors = [x, *ys, *(t for per_y in updates for pair in per_y for t in pair)]
    usable = module is not None and x.device.type == "cpu" and all(y.is_contiguous() for y in ys)
    if not usable or not all(t.dtype == torch.float32 for t in tensors):
        for y, per_y in zip(ys, updates, strict=True):
            for a, panels in per_y:
                lora_add_reference(y, x, a, panels)
        return ys
    module.lora_add_(
        [y.view(-1, y.shape[-1]) for y in ys],
        x.reshape(-1, x.shape[-1]).contiguous(),
        *kernel_arguments(updates),
    )
    return ys


def kernel_arguments(
    updates: Sequence[Sequence[Update]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The extension's ``lora_add_`` arguments after ys and x for ``updates[l]`` per output l: every A, every
    panels tensor, and each one's output index (grouped by output, in order)."""
    pairs = [(owner, pair) for owner, per_y in enumerate(updates) for pair in per_y]
    return [a for _, (a, _) in pairs], [panels for _, (_, panels) in pairs], [owner for owner, _ in pairs]


def lora_add_reference(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, panels: torch.Tensor
) -> torch.Tensor:
    return y.add_(F.linear(F.linear(x, a), unpack_b(panels, y.shape[-1])))
