"""Weight-only quantized linear layers: ``y = x @ dequantize(W)^T + b`` with W stored in 8 or 4 bits.

At batch 1 a decode step reads every weight once, so the bytes of the weights bound its speed; the activations
stay in the model's dtype (fp32 or bf16) and only the weights narrow.

- int8, symmetric: ``W[n, k] = d q[n, k]``, q in [-127, 127], d = max|W| / 127 over a group.
- int4, asymmetric in groups of ``group_size`` along K (llama.cpp's Q4_1, torchao's int4 weight-only):
  ``W[n, k] = d[n, g] q[n, k] + m[n, g]``, q in [0, 15], m the group's minimum, d = (max - m) / 15. Applied to
  weights dequantized from a Q4_1 GGUF it finds the file's own codes again.

Three layouts (``layout``), the first that applies:

- ``"lowbit"``: our CPU kernels (``lowbit_matmul``: int8 activations, VNNI / AVX2; one weight read for all of a
  tree's rows), groups of 32 for both widths with fp16 d, m (int8 is then Q8_0); x86 CPUs where it builds.
- ``"aten"``: torch's CPU kernels, ``aten._weight_int8pack_mm`` (int8 per output channel) and
  ``aten._weight_int4pack_mm_for_cpu`` (which computes ``(q - 8) d + zero``, so zero = m + 8 d).
- ``"codes"``: (N, K) codes and the torch reference (dequantize, then ``F.linear``): other devices.

Each kernel matches ``linear_reference`` up to the order of summation (and, for ``lowbit``, x rounded to 8 bits
per group of 32: ``lowbit_matmul.lowbit_matmul_reference`` is its exact contract).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import lowbit_matmul as lowbit

INT4_GROUP_SIZE = 32
LAYOUTS = ("lowbit", "aten", "codes")


@dataclass(frozen=True)
class Int8Weight:
    """``codes`` and ``scales`` in ``layout``: lowbit ``pack_int8`` / ``pack_scales`` blocks (groups of 32, fp16);
    aten (N, K) int8 and (N,) scales in the activations' dtype (per output channel)."""

    layout: str
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads."""
        return self.codes.nbytes + self.scales.nbytes

    def unpacked_codes(self) -> torch.Tensor:
        """(N, K) int8."""
        return lowbit.unpack_int8(self.codes) if self.layout == "lowbit" else self.codes

    def group_scales(self) -> torch.Tensor:
        """(N, G): d per group (G = 1: per output channel)."""
        return lowbit.unpack_scales(self.scales) if self.layout == "lowbit" else self.scales[:, None]

    def dequantize(self) -> torch.Tensor:
        """(N, K) in fp32 (lowbit) or the scales' dtype."""
        q = self.unpacked_codes()
        scales = self.group_scales()
        dtype = torch.float32 if self.layout == "lowbit" else scales.dtype
        groups = q.to(dtype).unflatten(1, (scales.shape[1], -1))
        return (groups * scales.to(dtype)[..., None]).flatten(1)


@dataclass(frozen=True)
class Int4Weight:
    """``codes``, ``scales`` and ``mins`` in ``layout``: lowbit ``pack_int4`` / ``pack_scales`` blocks (fp16);
    aten torch's packed codes, (N, G) scales and mins in the activations' dtype and its (G, N, 2)
    ``scale_and_zero`` table; codes (N, K) uint8 and (N, G)."""

    layout: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    group_size: int = INT4_GROUP_SIZE
    scale_and_zero: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.group_scales().shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads."""
        if self.layout == "aten":
            return self.codes.nbytes + self.scale_and_zero.nbytes
        return self.codes.nbytes + self.scales.nbytes + self.mins.nbytes

    def group_scales(self) -> torch.Tensor:
        """(N, G): d."""
        return lowbit.unpack_scales(self.scales) if self.layout == "lowbit" else self.scales

    def group_mins(self) -> torch.Tensor:
        """(N, G): m."""
        return lowbit.unpack_scales(self.mins) if self.layout == "lowbit" else self.mins

    def dequantize(self) -> torch.Tensor:
        """(N, K) in fp32 (lowbit) or the scales' dtype; aten's through its kernel itself (x = the identity)."""
        if self.layout == "aten":
            eye = torch.eye(self.in_features, dtype=self.scales.dtype, device=self.scales.device)
            return int4_linear(eye, self).T.contiguous()
        q = lowbit.unpack_int4(self.codes) if self.layout == "lowbit" else self.codes
        scales, mins = self.group_scales(), self.group_mins()
        dtype = torch.float32 if self.layout == "lowbit" else scales.dtype
        groups = q.to(dtype).unflatten(1, (-1, self.group_size))
        return (groups * scales.to(dtype)[..., None] + mins.to(dtype)[..., None]).flatten(1)


def _layout(weight: torch.Tensor, bits: str, group_size: int = lowbit.GROUP_SIZE) -> str:
    n, k = weight.shape
    if weight.device.type != "cpu":
        return "codes"
    if group_size == lowbit.GROUP_SIZE and lowbit.supports(bits, n, k):
        return "lowbit"
    if bits == "int4" and n % 16:  # torch's int4 kernel packs rows in blocks of 16
        return "codes"
    return "aten"


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """(N, K) float -> ``Int8Weight``: groups of 32 in fp16 where the lowbit kernel runs, else per channel (aten
    on a CPU, scales in the weight's dtype)."""
    w = weight.detach().float()
    layout = _layout(weight, "int8")
    if layout != "lowbit":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return Int8Weight("aten", q.contiguous(), scales.to(weight.dtype))
    groups = w.unflatten(1, (-1, lowbit.GROUP_SIZE))
    scales = (groups.abs().amax(dim=2) / 127).half()  # Q8_0: d in fp16, q = round(W / d)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    q = torch.round(groups / safe[..., None]).clamp(-127, 127).to(torch.int8).flatten(1)
    return Int8Weight("lowbit", lowbit.pack_int8(q), lowbit.pack_scales(scales))


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """(N, K) float -> ``Int4Weight`` with min/max groups of ``group_size`` along K (K must divide): lowbit (d, m
    in fp16, as Q4_1), aten or codes (d, m in the weight's dtype)."""
    k = weight.shape[1]
    if k % group_size:
        raise ValueError(f"int4 weights need in_features divisible by {group_size}, got {k}")
    layout = _layout(weight, "int4", group_size)
    w = weight.detach().float().unflatten(1, (k // group_size, group_size))
    mins, maxs = w.amin(dim=2), w.amax(dim=2)
    dtype = torch.float16 if layout == "lowbit" else weight.dtype
    scales, mins = ((maxs - mins) / 15).to(dtype), mins.to(dtype)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
    q = torch.round((w - mins.float()[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8).flatten(1)
    if layout == "lowbit":
        return Int4Weight(layout, lowbit.pack_int4(q), lowbit.pack_scales(scales), lowbit.pack_scales(mins))
    if layout == "codes":
        return Int4Weight(layout, q.contiguous(), scales, mins, group_size)
    scale_and_zero = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return Int4Weight(layout, packed, scales, mins, group_size, scale_and_zero)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) -> (..., N) with an ``Int8Weight``; x fp32 or bf16 (aten: in the scales' dtype)."""
    if x.device.type != "cpu":
        return linear_reference(x, weight, bias)
    if weight.layout == "lowbit":
        return _on_rows(x, lambda rows: lowbit.int8_matmul(rows, weight.codes, weight.scales), bias)
    return _on_rows(
        x, lambda rows: torch.ops.aten._weight_int8pack_mm(rows, weight.codes, weight.scales), bias
    )


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) -> (..., N) with an ``Int4Weight``; x fp32 or bf16 (aten: in the scales' dtype)."""
    if weight.layout == "codes" or x.device.type != "cpu":
        return linear_reference(x, weight, bias)
    if weight.layout == "lowbit":
        return _on_rows(
            x, lambda rows: lowbit.int4_matmul(rows, weight.codes, weight.scales, weight.mins), bias
        )
    return _on_rows(
        x,
        lambda rows: torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, weight.codes, weight.group_size, weight.scale_and_zero
        ),
        bias,
    )


def linear_reference(
    x: torch.Tensor, weight: Int8Weight | Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch reference of both: dequantize, then ``F.linear`` in x's dtype."""
    return F.linear(x, weight.dequantize().to(x.dtype), bias)


def _on_rows(x: torch.Tensor, matmul, bias: torch.Tensor | None) -> torch.Tensor:
    """``matmul`` (M, K) -> (M, N) over x's rows (..., K), then the bias."""
    y = matmul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias
