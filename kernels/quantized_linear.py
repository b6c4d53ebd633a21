"""Weight-only quantized linear layers: ``y = x @ dequantize(W)^T + b`` with W stored in 8 or 4 bits.

At batch 1 a decode step reads every weight once, so the bytes of the weights bound its speed; these keep
the activations in the model's dtype (fp32 or bf16) and only the weights narrow.

- int8, per output channel, symmetric: ``W[n, k] = q[n, k] * s[n]``, q in [-127, 127], s = max|W[n]| / 127.
  Kernel: ``aten._weight_int8pack_mm`` (CPU).
- int4, in groups of ``group_size`` input columns, asymmetric (llama.cpp's Q4_1, torchao's int4 weight-only):
  ``W[n, k] = d[n, g] * q[n, k] + m[n, g]``, q in [0, 15], g = k // group_size, m the group's minimum,
  d = (max - m) / 15. Applied to weights dequantized from a Q4_1 GGUF it finds the file's own codes again.
  Kernel: ``aten._weight_int4pack_mm_for_cpu``, which computes ``(q - 8) * scale + zero`` (so scale = d,
  zero = m + 8 d), on weights packed once by ``aten._convert_weight_to_int4pack_for_cpu``.

Each op has its torch reference (dequantize, then ``F.linear``); the kernels match it up to the order of
summation. The kernels are torch's CPU ones; on other devices the reference runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUP_SIZE = 32


@dataclass(frozen=True)
class Int8Weight:
    """``q`` (N, K) int8 and ``scales`` (N,) in the activations' dtype."""

    q: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads."""
        return self.q.nbytes + self.scales.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.q.to(self.scales.dtype) * self.scales[:, None]


@dataclass(frozen=True)
class Int4Weight:
    """``scales`` and ``mins`` (N, K / group_size) in the activations' dtype, and the codes (N, K) in [0, 15]:
    ``packed`` in the CPU kernel's layout with its (K / group_size, N, 2) ``scale_and_zero`` table, else ``q``
    (uint8) for the reference."""

    scales: torch.Tensor
    mins: torch.Tensor
    q: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    scale_and_zero: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def in_features(self) -> int:
        return self.q.shape[1] if self.q is not None else self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads."""
        if self.packed is not None:
            return self.packed.nbytes + self.scale_and_zero.nbytes
        return self.q.nbytes + self.scales.nbytes + self.mins.nbytes

    def dequantize(self) -> torch.Tensor:
        """(N, K) in the scales' dtype; from packed codes through the kernel itself (x = the identity)."""
        if self.q is None:
            eye = torch.eye(self.in_features, dtype=self.scales.dtype, device=self.scales.device)
            return int4_linear(eye, self).T.contiguous()
        q = self.q.unflatten(1, (-1, self.group_size)).to(self.scales.dtype)
        return (q * self.scales[..., None] + self.mins[..., None]).flatten(1)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """(N, K) float -> ``Int8Weight``, scales in the weight's dtype."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.to(weight.dtype))


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """(N, K) float -> ``Int4Weight`` with min/max groups of ``group_size`` along K (K must divide), scales in
    the weight's dtype."""
    k = weight.shape[1]
    if k % group_size:
        raise ValueError(f"int4 weights need in_features divisible by {group_size}, got {k}")
    w = weight.detach().float().unflatten(1, (k // group_size, group_size))
    mins, maxs = w.amin(dim=2), w.amax(dim=2)
    scales = (maxs - mins) / 15
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round((w - mins[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
    scales, mins = scales.to(weight.dtype), mins.to(weight.dtype)
    if weight.device.type != "cpu" or weight.shape[0] % 16:  # the kernel packs rows in blocks of 16
        return Int4Weight(scales, mins, q=q.contiguous())
    # the kernel computes (q - 8) * scale + zero: scale = d, zero = m + 8 d
    scale_and_zero = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return Int4Weight(scales, mins, packed=packed, scale_and_zero=scale_and_zero)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) -> (..., N) with an ``Int8Weight``; x in the scales' dtype."""
    if x.device.type != "cpu":
        return linear_reference(x, weight, bias)
    return _on_rows(x, lambda rows: torch.ops.aten._weight_int8pack_mm(rows, weight.q, weight.scales), bias)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) -> (..., N) with an ``Int4Weight``; x in the scales' dtype."""
    if weight.packed is None or x.device.type != "cpu":
        return linear_reference(x, weight, bias)
    return _on_rows(
        x,
        lambda rows: torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, weight.packed, weight.group_size, weight.scale_and_zero
        ),
        bias,
    )


def linear_reference(
    x: torch.Tensor, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch reference of both: dequantize, then ``F.linear``."""
    return F.linear(x, weight.dequantize(), bias)


def _on_rows(x: torch.Tensor, matmul, bias: torch.Tensor | None) -> torch.Tensor:
    """``matmul`` (M, K) -> (M, N) over x's rows (..., K), then the bias."""
    y = matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias
