"""Tree attention for Medusa verification: T tree tokens attend to a cached prefix and their tree ancestors.

Layout: q (B, Hq, T, D); k, v (B, Hkv, S, D) with S = P + T. Key rows [0, P) are the cached prefix, which
every tree token sees; rows [P, S) are the tree tokens in q's order, visible per the packed ancestor-or-self
mask `tree_bits` (int32 (T, ceil(T/32)): bit j % 32 of word j // 32 of row i set iff token i sees token j).
GQA: q head h reads kv head h // (Hq // Hkv).

`tree_attention_cpu` (the CPU extension) computes row by row, the same arithmetic for a row whatever T is.

`tree_attention_triton` is a flash-decoding style kernel:
  * the G = Hq // Hkv query heads sharing a kv head are packed into one row block of G * T rows, so each
    K/V tile is loaded once per group instead of once per query head (no repeated K/V in memory);
  * full prefix blocks of BLOCK_N keys run with no mask at all; the tail (the partial prefix block plus
    the T tree keys) runs masked, by bounds for the prefix and by the bitmask for the tree;
  * the prefix is split over `num_splits` programs (split-KV) when B * Hkv * row blocks alone cannot fill
    the GPU; each split writes a normalised partial output and its log-sum-exp, which a second small kernel
    merges. With one split the main kernel writes the output directly.

Block sizes (for H100, not yet timed on one, see docs/kernels.md): BLOCK_N = 64 keys; BLOCK_M = G * T
rounded up to a power of two, clamped to [16, 64] (64 rows per warpgroup is the wgmma tile); BLOCK_D = head
dim rounded up to a power of two (>= 16; 96 -> 128 with masked loads); 8 warps, 3 pipeline stages (a K and
a V tile of 64 x 128 bf16 take 32 KiB per stage). Compiled ahead of time for sm_90 (bf16, D = 128, BLOCK_M
= 64) this uses 189 registers and spills nothing; 4 warps spilled (255 registers + 360 B of stack).
Split count: enough programs for one wave of SMs, with at least 4 prefix blocks (256 keys) per split.
T <= 128 in the kernel (a row's tree bits are held in 4 int32 words); the reference takes any T.
q, k, v may have any strides (e.g. transposed views); tree_bits is made contiguous; the output is a new
contiguous tensor.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from ._cpu import extension
from ._triton import check_launchable, jit, tl, triton

_BLOCK_N = 64
_MAX_BLOCK_M = 64
_MIN_BLOCKS_PER_SPLIT = 4
_MAX_TREE = 128  # the kernel keeps a row's tree bits in 4 int32 words
_NUM_WARPS = 8
_NUM_STAGES = 3


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack bool (T, T) into int32 (T, ceil(T/32)): bit j % 32 of word j // 32 of row i is mask[i, j]."""
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"expected a square bool mask, got {tuple(mask.shape)} {mask.dtype}")
    t = mask.shape[0]
    words = -(-t // 32)
    padded = torch.zeros(t, words * 32, dtype=torch.int64, device=mask.device)
    padded[:, :t] = mask
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    packed = (padded.view(t, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_tree_mask(bits: torch.Tensor, tree_len: int) -> torch.Tensor:
    """Inverse of `pack_tree_mask`: int32 (T, ceil(T/32)) -> bool (T, T)."""
    if bits.shape != (tree_len, -(-tree_len // 32)):
        raise ValueError(
            f"expected tree bits of shape ({tree_len}, {-(-tree_len // 32)}), got {tuple(bits.shape)}"
        )
    j = torch.arange(tree_len, device=bits.device)
    words = bits[:, j // 32].to(torch.int64)
    return ((words >> (j % 32)) & 1).bool()


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_bits: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q (B, Hq, T, D) and k, v (B, Hkv, S, D); got {q.shape}, {k.shape}, {v.shape}"
        )
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[2] < t:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (need S >= T)")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if tree_bits.dtype != torch.int32 or tree_bits.shape != (t, -(-t // 32)):
        raise ValueError(
            f"tree_bits must be int32 of shape ({t}, {-(-t // 32)}), "
            f"got {tree_bits.dtype} {tuple(tree_bits.shape)}"
        )
    if not q.device == k.device == v.device == tree_bits.device:
        raise ValueError("q, k, v and tree_bits must be on one device")


def tree_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_bits: torch.Tensor, scale: float
) -> torch.Tensor:
    """Tree attention via SDPA with a dense bool mask; computes in fp32 on CPU, in the input dtype on GPU."""
    _check_inputs(q, k, v, tree_bits)
    t, prefix_len = q.shape[2], k.shape[2] - q.shape[2]
    tree = unpack_tree_mask(tree_bits, t)
    mask = torch.cat([tree.new_ones(t, prefix_len), tree], dim=1)
    group = q.shape[1] // k.shape[1]
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    out = F.scaled_dot_product_attention(
        q.to(compute),
        k.to(compute).repeat_interleave(group, dim=1),
        v.to(compute).repeat_interleave(group, dim=1),
        attn_mask=mask,
        scale=scale,
    )
    return out.to(q.dtype)


def tree_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_bits: torch.Tensor, scale: float
) -> torch.Tensor:
    """The CPU extension's kernel (``csrc/tree_attention.cpp``, fp32 or bf16, fp32 inside): each row gathers its
    visible keys (prefix, then its tree ancestors and itself, in order) and runs one fixed sequence of operations
    on them, so a row's output depends only on those keys, not on the step's size: a token verified in a tree gets
    what it would get decoded alone. Returns (B, Hq, T, D), a view of a (B, T, Hq, D) contiguous tensor."""
    _check_inputs(q, k, v, tree_bits)
    prefix_len = k.shape[2] - q.shape[2]
    return extension().tree_attention(q, k, v, tree_bits, prefix_len, float(scale)).transpose(1, 2)


@jit
def _tree_attn_fwd_kernel(
    Q,
    K,
    V,
    Bits,
    Out,
    OPart,
    LsePart,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    num_words,
    prefix_len,
    tree_len,
    num_kv_heads,
    qk_scale,
    blocks_per_split,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M packed (head in group, tree token) rows of one (batch, kv head) and split."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)  # batch offsets can pass 2**31 elements for big caches
    kvh = pid_bh % num_kv_heads

    num_rows = GROUP * tree_len
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    tok = rows % tree_len
    head = kvh * GROUP + rows // tree_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (
        Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh + offs_d[:, None] * stride_kd
    v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full prefix blocks of this split: every row sees every key, no mask.
    num_full = prefix_len // BLOCK_N
    blk_lo = split * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, num_full)
    for blk in range(blk_lo, blk_hi):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * stride_ks, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs, mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Tail, done by the last split: partial prefix block (bounds mask) and tree keys (bitmask).
    seq_len = prefix_len + tree_len
    if split == tl.num_programs(2) - 1:
        # The row's ancestor bits: T <= 128, so at most 4 words, loaded once and picked per column below
        # (a per-element gather would cost a (BLOCK_M, BLOCK_N) pointer tile and spill registers).
        bits_row = Bits + tok * num_words
        # A tensor of zeros keeps `word_no + i < num_words` a tensor when num_words == 1 is specialised.
        word_no = tl.full([BLOCK_M], 0, tl.int32)
        w0 = tl.load(bits_row, mask=row_ok, other=0)
        w1 = tl.load(bits_row + 1, mask=row_ok & (word_no + 1 < num_words), other=0)
        w2 = tl.load(bits_row + 2, mask=row_ok & (word_no + 2 < num_words), other=0)
        w3 = tl.load(bits_row + 3, mask=row_ok & (word_no + 3 < num_words), other=0)
        for start_n in range(num_full * BLOCK_N, seq_len, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            j = offs_n - prefix_len
            in_tree = (j >= 0) & (j < tree_len)
            j = tl.where(in_tree, j, 0)
            word = (j // 32)[None, :]
            words = tl.where(
                word == 0,
                w0[:, None],
                tl.where(word == 1, w1[:, None], tl.where(word == 2, w2[:, None], w3[:, None])),
            )
            tree_bit = ((words >> (j % 32)[None, :]) & 1) != 0
            visible = (offs_n < prefix_len)[None, :] | (in_tree[None, :] & tree_bit)
            n_ok = offs_n < seq_len
            k = tl.load(k_base + offs_n[None, :] * stride_ks, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    out_rows = pid_bh * num_rows + rows  # == flat index into a contiguous (B, Hq, T) layout
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = split * (tl.num_programs(1) * num_rows) + out_rows
        tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=o_mask)
        tl.store(LsePart + part, m_i + tl.log2(l_i), mask=row_ok)
    else:
        tl.store(
            Out + out_rows[:, None] * HEAD_DIM + offs_d[None, :], o.to(Out.dtype.element_ty), mask=o_mask
        )


@jit
def _tree_attn_combine_kernel(
    OPart,
    LsePart,
    Out,
    num_rows,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per output row: merge the per-split normalised outputs weighted by their log2-sum-exp."""
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(LsePart + offs_s * num_rows + row, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(
        OPart + (offs_s * num_rows + row)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * o, 0)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def fwd_launch_config(group: int, tree_len: int, head_dim: int, dtype: torch.dtype) -> dict[str, Any]:
    """The forward kernel's constexprs and launch options for a shape (what `tree_attention_triton` uses)."""
    return {
        "BLOCK_M": min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(group * tree_len))),
        "BLOCK_N": _BLOCK_N,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": _NUM_WARPS,
        "num_stages": _NUM_STAGES if dtype != torch.float32 else 2,  # 3 fp32 stages: 176 KiB > sm_80's 163
    }


def combine_launch_config(num_splits: int, head_dim: int) -> dict[str, Any]:
    """The split-merge kernel's constexprs (Triton's default num_warps / num_stages)."""
    return {
        "BLOCK_S": triton.next_power_of_2(num_splits),
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
    }


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_splits(device: torch.device, programs: int, full_blocks: int) -> int:
    """Split the prefix until the grid fills one wave of SMs, >= _MIN_BLOCKS_PER_SPLIT blocks per split."""
    if device.type != "cuda":
        return 1
    wanted = triton.cdiv(_sm_count(device.index or 0), programs)
    return max(1, min(wanted, full_blocks // _MIN_BLOCKS_PER_SPLIT))


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_bits: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton tree attention; same contract as `tree_attention_reference`.

    `num_splits` overrides the split-KV heuristic (an upper bound: splits never get an empty prefix range).
    """
    _check_inputs(q, k, v, tree_bits)
    check_launchable(_tree_attn_fwd_kernel, q)
    batch, q_heads, tree_len, head_dim = q.shape
    if tree_len > _MAX_TREE:
        raise ValueError(f"tree_attention_triton supports trees of up to {_MAX_TREE} tokens, got {tree_len}")
    kv_heads, prefix_len = k.shape[1], k.shape[2] - tree_len
    group = q_heads // kv_heads
    num_rows = group * tree_len
    config = fwd_launch_config(group, tree_len, head_dim, q.dtype)
    m_blocks = triton.cdiv(num_rows, config["BLOCK_M"])

    full_blocks = prefix_len // _BLOCK_N
    if num_splits is None:
        num_splits = _default_splits(q.device, m_blocks * batch * kv_heads, full_blocks)
    blocks_per_split = triton.cdiv(full_blocks, max(1, num_splits))
    num_splits = triton.cdiv(full_blocks, blocks_per_split) if full_blocks else 1

    out = torch.empty((batch, q_heads, tree_len, head_dim), dtype=q.dtype, device=q.device)
    split = num_splits > 1
    total_rows = batch * q_heads * tree_len
    o_part = (
        torch.empty((num_splits, total_rows, head_dim), dtype=torch.float32, device=q.device)
        if split
        else out
    )
    lse_part = torch.empty((num_splits, total_rows), dtype=torch.float32, device=q.device) if split else out
    _tree_attn_fwd_kernel[(m_blocks, batch * kv_heads, num_splits)](
        q,
        k,
        v,
        tree_bits.contiguous(),
        out,
        o_part,
        lse_part,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        tree_bits.shape[1],
        prefix_len,
        tree_len,
        kv_heads,
        scale * math.log2(math.e),
        blocks_per_split,
        GROUP=group,
        HEAD_DIM=head_dim,
        SPLIT=split,
        **config,
    )
    if split:
        _tree_attn_combine_kernel[(total_rows,)](
            o_part,
            lse_part,
            out,
            total_rows,
            num_splits,
            HEAD_DIM=head_dim,
            **combine_launch_config(num_splits, head_dim),
        )
    return out
