"""KV compaction: reference and Triton against an expectation recomputed with index_select before the move.

See test_kernels_tree_attention.py for why TRITON_INTERPRET is set before importing medusa_lora.kernels.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from medusa_lora.kernels import compact_kv_reference
from medusa_lora.kernels._triton import HAS_TRITON, interpreter_ready, is_interpreted

ck = importlib.import_module("medusa_lora.kernels.compact_kv")  # the package's `compact_kv` is the function
ON_GPU = HAS_TRITON and torch.cuda.is_available() and not is_interpreted(ck._compact_kv_kernel)
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    not (ON_GPU or interpreter_ready(ck._compact_kv_kernel)),
    reason="triton is missing, or it (or medusa_lora.kernels) was imported before TRITON_INTERPRET=1 "
    "was set: set TRITON_INTERPRET=1 in the environment or at the top of tests/conftest.py",
)
IMPLS = [
    pytest.param(compact_kv_reference, id="reference"),
    pytest.param(ck.compact_kv_triton, id="triton", marks=needs_triton),
]
PATHS = [[0], [0, 1, 2], [0, 2, 3], [0, 5, 9, 10], [0, 3, 4, 5, 6, 11], list(range(0, 26, 3))]


def make_caches(num_layers, prefix_len, tree_len, dtype, seed=0, transposed=False, spare=0):
    """Per-layer (B=2, H=3, S, D=40) caches with distinct contents; `transposed`: non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)
    seq = prefix_len + tree_len + spare
    if transposed:
        make = lambda: torch.randn(2, seq, 3, 40, generator=gen).transpose(1, 2)
    else:
        make = lambda: torch.randn(2, 3, seq, 40, generator=gen)
    keys = [make().to(DEVICE, dtype) for _ in range(num_layers)]
    values = [make().to(DEVICE, dtype) for _ in range(num_layers)]
    return keys, values


def check_compaction(impl, keys, values, prefix_len, accepted):
    """Rows prefix_len + i hold the old rows prefix_len + accepted[i]; every other row is untouched."""
    before = [c.clone() for c in (*keys, *values)]
    impl(keys, values, prefix_len, accepted)
    end = prefix_len + len(accepted)
    for cache, old in zip((*keys, *values), before):
        expected = old.index_select(2, accepted.to(old.device, torch.int64) + prefix_len)
        assert torch.equal(cache[:, :, prefix_len:end], expected)
        assert torch.equal(cache[:, :, :prefix_len], old[:, :, :prefix_len])
        assert torch.equal(cache[:, :, end:], old[:, :, end:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", PATHS, ids=str)
@pytest.mark.parametrize("prefix_len", [0, 37])
def test_compaction_moves_the_accepted_rows(impl, path, prefix_len):
    keys, values = make_caches(3, prefix_len, 26, torch.float32, seed=len(path))
    check_compaction(impl, keys, values, prefix_len, torch.tensor(path, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compaction_is_bit_exact_in_half_precision(impl, dtype):
    keys, values = make_caches(2, 5, 7, dtype)
    check_compaction(impl, keys, values, 5, torch.tensor([0, 2, 3, 6], device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
def test_compaction_of_strided_caches_with_spare_capacity(impl):
    """Non-contiguous (B, S, H, D)-backed views, extra rows past the tree, an int32 path."""
    keys, values = make_caches(2, 11, 64, torch.float32, transposed=True, spare=5)
    path = torch.tensor([0, 1, 4, 30, 31, 32, 33, 63], dtype=torch.int32, device=DEVICE)
    check_compaction(impl, keys, values, 11, path)


@pytest.mark.parametrize("impl", IMPLS)
def test_compaction_of_a_long_path(impl):
    """L = 128 rows: the kernel tiles the head dim so the (rows x head-dim) tile stays small."""
    keys, values = make_caches(1, 3, 128, torch.float32)
    check_compaction(impl, keys, values, 3, torch.arange(128, device=DEVICE))
    path = torch.tensor(sorted({0, *torch.randperm(127)[:90].add(1).tolist()}), device=DEVICE)
    check_compaction(impl, keys, values, 3, path)


@needs_triton
def test_triton_compacts_all_layers_in_one_launch(monkeypatch):
    kernel = ck._compact_kv_kernel
    grids = []
    run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, grid, **kw: grids.append(grid) or run(*a, grid=grid, **kw))
    keys, values = make_caches(4, 9, 7, torch.float32)
    check_compaction(ck.compact_kv_triton, keys, values, 9, torch.tensor([0, 2, 3], device=DEVICE))
    assert len(grids) == 1 and grids[0][0] == 8  # 4 layers x (keys, values)


@pytest.mark.parametrize("impl", IMPLS)
def test_compaction_rejects_bad_inputs(impl):
    keys, values = make_caches(2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="1-D integer"):
        impl(keys, values, 4, torch.tensor([[0, 1]], device=DEVICE))
    with pytest.raises(ValueError, match="cannot hold"):
        impl(keys, values, 4, torch.arange(4, device=DEVICE))


@needs_triton
def test_triton_rejects_mixed_dtypes():
    keys, values = make_caches(2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="share"):
        ck.compact_kv_triton(keys, [v.half() for v in values], 4, torch.tensor([0, 2], device=DEVICE))
