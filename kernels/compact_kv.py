"""Compact the KV cache after a speculative step: keep the accepted tree path, in place, for every layer.

Each cache tensor is (B, H, S, D) and holds P prefix rows then T tree rows. For the accepted path
`accepted` (strictly increasing tree indices, accepted[0] == 0, length L <= T), row P + accepted[i] moves
to row P + i; the caller truncates to P + L afterwards. Sources and destinations overlap (accepted =
[0, 2, 3] reads rows P+2, P+3 and writes P+1, P+2), so all L rows are read before any is written.

`compact_kv_triton` is ONE launch for all layers, keys and values: a host-built int64 table holds, per
cache tensor, its data pointer and its four strides; the kernel casts the pointer back to a typed pointer
(`.to(tl.pointer_type(...))`). One program owns one (tensor, batch, head, head-dim block) slab: it loads
its L accepted rows into registers, passes a CTA barrier (the tile is spread over warps, so without it one
warp could overwrite a row another warp has yet to read), then stores them; programs touch disjoint
slabs. Rows with accepted[i] == i are neither read nor written. The table costs one small pinned,
non-blocking host-to-device copy per call. In the interpreter the table holds host addresses, so there
it works for CPU tensors only (checked).
"""

from __future__ import annotations

import torch

from ._triton import check_launchable, is_interpreted, jit, tl, triton

_MAX_TILE = 4096  # elements of one (rows x head-dim) register tile per program


def _check_inputs(caches: list[torch.Tensor], prefix_len: int, accepted: torch.Tensor) -> None:
    if accepted.dim() != 1 or accepted.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"accepted must be a 1-D integer tensor, got {accepted.dtype} {tuple(accepted.shape)}"
        )
    for cache in caches:
        if cache.dim() != 4 or cache.shape[2] < prefix_len + accepted.numel():
            raise ValueError(f"cache {tuple(cache.shape)} cannot hold {prefix_len} + {accepted.numel()} rows")


def compact_kv_reference(
    keys: list[torch.Tensor], values: list[torch.Tensor], prefix_len: int, accepted: torch.Tensor
) -> None:
    """In place, for every cache tensor: row prefix_len + accepted[i] -> row prefix_len + i (index_select)."""
    caches = [*keys, *values]
    _check_inputs(caches, prefix_len, accepted)
    rows = accepted.to(torch.int64) + prefix_len
    for cache in caches:
        gathered = cache.index_select(2, rows.to(cache.device))  # a copy: every read precedes the writes
        cache[:, :, prefix_len : prefix_len + rows.numel()] = gathered


@jit
def _compact_kv_kernel(
    Table,
    Accepted,
    Ref,
    prefix_len,
    num_accepted,
    num_heads,
    head_dim,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: the accepted rows of one (cache tensor, batch, head, head-dim block)."""
    entry = Table + tl.program_id(0) * 5  # [data_ptr, stride_b, stride_h, stride_s, stride_d]
    base = tl.load(entry).to(tl.pointer_type(Ref.dtype.element_ty))
    stride_b = tl.load(entry + 1)
    stride_h = tl.load(entry + 2)
    stride_s = tl.load(entry + 3)
    stride_d = tl.load(entry + 4)
    bh = tl.program_id(1)
    base += (bh // num_heads) * stride_b + (bh % num_heads) * stride_h

    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    src = tl.load(Accepted + offs_l, mask=offs_l < num_accepted, other=0).to(tl.int64)
    moved = (offs_l < num_accepted) & (src != offs_l)
    mask = moved[:, None] & (offs_d < head_dim)[None, :]
    rows = tl.load(base + (prefix_len + src)[:, None] * stride_s + offs_d[None, :] * stride_d, mask=mask)
    tl.debug_barrier()  # the tile is spread over warps: every thread's loads must land before any store
    tl.store(base + (prefix_len + offs_l)[:, None] * stride_s + offs_d[None, :] * stride_d, rows, mask=mask)


def launch_config(num_accepted: int, head_dim: int) -> dict[str, int]:
    """The kernel's constexprs for a path length and head dim (Triton's default num_warps / num_stages)."""
    block_l = triton.next_power_of_2(num_accepted)
    return {
        "BLOCK_L": block_l,
        "BLOCK_D": min(triton.next_power_of_2(head_dim), max(16, _MAX_TILE // block_l)),
    }


def compact_kv_triton(
    keys: list[torch.Tensor], values: list[torch.Tensor], prefix_len: int, accepted: torch.Tensor
) -> None:
    """`compact_kv_reference` in one Triton launch over every layer's keys and values.

    All cache tensors must share device, dtype and (B, H, D); S and strides may differ. `accepted` is
    trusted (a range check would cost a sync); pass it on the caches' device to avoid a copy.
    """
    caches = [*keys, *values]
    _check_inputs(caches, prefix_len, accepted)
    if not caches or accepted.numel() == 0:
        return
    ref = caches[0]
    check_launchable(_compact_kv_kernel, ref)
    batch, heads, _, head_dim = ref.shape
    layout = (ref.device, ref.dtype, ref.shape[:2], head_dim)
    if any((c.device, c.dtype, c.shape[:2], c.shape[3]) != layout for c in caches):
        raise ValueError("all cache tensors must share device, dtype, batch, heads and head dim")
    if ref.is_cuda and is_interpreted(_compact_kv_kernel):
        raise RuntimeError(
            "the Triton interpreter cannot follow device pointers: "
            "compact CPU tensors or unset TRITON_INTERPRET"
        )

    table = torch.tensor([[c.data_ptr(), *c.stride()] for c in caches], dtype=torch.int64)
    if ref.is_cuda:  # pinned + non_blocking: a pageable copy would synchronise the stream
        table = table.pin_memory().to(ref.device, non_blocking=True)
    num_accepted = accepted.numel()
    config = launch_config(num_accepted, head_dim)
    grid = (len(caches), batch * heads, triton.cdiv(head_dim, config["BLOCK_D"]))
    _compact_kv_kernel[grid](
        table,
        accepted.to(ref.device).contiguous(),
        ref,
        prefix_len,
        num_accepted,
        heads,
        head_dim,
        **config,
    )
