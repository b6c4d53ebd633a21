"""Low-bit weights x int8 activations on the CPU: ``y = x W^T`` with W in 4 or 8 bits in groups of 32 along K.

- int4: ``W[n, k] = d[n, g] q[n, k] + m[n, g]``, q in [0, 15] (llama.cpp's Q4_1); int8: ``W = d q``, q in
  [-127, 127] (Q8_0); d, m fp16, g = k // 32.
- Each row of x is quantized per group of 32 to int8 (``s = max|x| / 127``, ``xq = round(x / s)``: llama.cpp's
  Q8 activations), so a group's dot product is integer: ``y[r, n] = sum_g d s (q . xq) + m sum(x[r, g])``.

Why: torch's CPU low-bit kernels read a weight once per row, so a tree of 10 tokens costs ~3x one token; these
read each block of 16 output channels once for all rows (AVX-512 VNNI, or AVX2), and every row's
arithmetic is the same whatever the number of rows, so a tree's logits equal one-token steps' up to attention.

The C++ (``csrc/lowbit_matmul.cpp``) is part of the CPU extension (``_cpu``: built for this CPU on first use,
cached, ``MEDUSA_LORA_CPU_KERNELS=0`` turns it off). The references below are the contract.
"""

from __future__ import annotations

import torch

from ._cpu import build, extension

GROUP_SIZE = 32
BLOCK = 16  # output channels a kernel block computes


def supports(bits: str, out_features: int, in_features: int) -> bool:
    """Whether the extension computes a (out_features, in_features) weight of ``bits`` ("int4" / "int8") here."""
    module = extension()
    if module is None or module.isa() == "none" or out_features % BLOCK or in_features % GROUP_SIZE:
        return False
    return bits in ("int4", "int8")


# ---- packing: (N, K) codes and (N, G) scales -> the kernel's blocks (csrc/lowbit_matmul.cpp's layout) ----


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N/16, K/32, 4, 64) uint8: byte ``4c + t`` of tile j holds channel c's codes
    ``8j + t`` (low nibble) and ``8j + 4 + t`` (high)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n // BLOCK, BLOCK, k // GROUP_SIZE, 4, 2, 4)  # b c g j h t
    blocks = blocks.permute(0, 2, 3, 1, 5, 4)  # b g j c t h
    return (blocks[..., 0] | (blocks[..., 1] << 4)).reshape(n // BLOCK, k // GROUP_SIZE, 4, 64).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """``pack_int4``'s inverse: (N, K) uint8 codes."""
    b, groups = packed.shape[:2]
    tiles = packed.reshape(b, groups, 4, BLOCK, 4)  # b g j c t
    both = torch.stack([tiles & 0x0F, tiles >> 4], dim=-1)  # b g j c t h
    return both.permute(0, 3, 1, 2, 5, 4).reshape(b * BLOCK, groups * GROUP_SIZE)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [-127, 127] -> (N/16, K/32, 8, 64) uint8 of ``q + 128``: byte ``4c + t`` of tile j holds
    channel c's code ``4j + t``."""
    n, k = q.shape
    shifted = (q.to(torch.int16) + 128).to(torch.uint8)
    blocks = shifted.reshape(n // BLOCK, BLOCK, k // GROUP_SIZE, 8, 4).permute(0, 2, 3, 1, 4)  # b g j c t
    return blocks.reshape(n // BLOCK, k // GROUP_SIZE, 8, 64).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """``pack_int8``'s inverse: (N, K) int8 codes."""
    b, groups = packed.shape[:2]
    codes = (
        packed.reshape(b, groups, 8, BLOCK, 4).permute(0, 3, 1, 2, 4).reshape(b * BLOCK, groups * GROUP_SIZE)
    )
    return (codes.to(torch.int16) - 128).to(torch.int8)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """(N, G) -> (N/16, G, 16) fp16."""
    n, groups = scales.shape
    return scales.to(torch.float16).reshape(n // BLOCK, BLOCK, groups).transpose(1, 2).contiguous()


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """``pack_scales``'s inverse: (N, G) fp16."""
    return packed.transpose(1, 2).reshape(-1, packed.shape[1])


# ---- the ops and their references ----


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> torch.Tensor:
    """(M, K) fp32 / bf16 -> (M, N) in x's dtype, on ``pack_int4`` codes and ``pack_scales`` scales and mins
    (weights packed where ``supports`` said yes: the built extension, without asking again)."""
    return int4_matmul_many(x, [(packed, scales, mins)])[0]


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) fp32 / bf16 -> (M, N) in x's dtype, on ``pack_int8`` codes and ``pack_scales`` scales."""
    return build().module.int8_matmul(x.contiguous(), [packed], [scales])[0]


def int4_matmul_many(
    x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """``int4_matmul`` of x with each (packed, scales, mins) in ``weights``: x quantized once, one parallel loop
    (a layer's q, k, v projections, or its gate and up)."""
    packed, scales, mins = (list(part) for part in zip(*weights))
    return build().module.int4_matmul(x.contiguous(), packed, scales, mins)


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) -> int8 codes (M, K), scales (M, G) and sums (M, G) of x per group of 32 (fp32)."""
    groups = x.float().unflatten(-1, (-1, GROUP_SIZE))
    amax = groups.abs().amax(dim=-1)
    scales = amax / 127
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(groups * inverse[..., None]).to(torch.int8)
    return codes.flatten(-2), scales, groups.sum(dim=-1)


def lowbit_matmul_reference(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> torch.Tensor:
    """Both kernels' contract in float64: x's rows quantized as the kernels do, then
    ``sum_g d s (q . xq) + m sum(x_g)``; q (N, K) codes, scales / mins (N, G). Returns (M, N) fp64."""
    codes, x_scales, x_sums = quantize_activations_reference(x)
    xq = codes.double().unflatten(-1, (-1, GROUP_SIZE))  # M G 32
    wq = q.double().unflatten(-1, (-1, GROUP_SIZE))  # N G 32
    dots = torch.einsum("mgi,ngi->mng", xq, wq)
    y = (dots * scales.double()[None] * x_scales.double()[:, None]).sum(-1)
    if mins is not None:
        y = y + x_sums.double() @ mins.double().T
    return y
