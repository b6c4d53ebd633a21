"""Rotary position embedding written into a destination: ``out (B, H, T, D) = x * cos + rotate_half(x) * sin``
for the projection's (B, T, H, D) view ``x`` (the CPU extension, ``csrc/rotary.cpp``, fp32). transformers'
``apply_rotary_pos_emb`` op for op (each product and the sum rounded on its own), so equal to it bit for bit; one
call instead of eight ops, and keys go straight into a preallocated cache.
"""

from __future__ import annotations

import torch

from ._cpu import extension


def rotary_(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Write the rotated ``x`` (B, T, H, D) into ``out`` (B, H, T, D) with ``cos``, ``sin`` (B, T, D); returns out.
    The kernel for fp32 CPU tensors where it builds, else ``rotary_reference``."""
    module = extension()
    if module is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return out.copy_(rotary_reference(x, cos, sin))
    module.rotary_(out, x, cos, sin)
    return out


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' formula: (B, T, H, D) -> (B, H, T, D)."""
    x = x.transpose(1, 2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos[:, None]) + (rotated * sin[:, None])
