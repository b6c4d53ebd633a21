"""Tree attention: packed masks, the SDPA reference vs naive eager attention, Triton vs the reference.

Without CUDA the Triton kernels run in the interpreter. Whether a jit function is interpreted is fixed
when it is decorated, on import, and that includes triton.language's own helpers (tl.sum, ...). So this
module sets TRITON_INTERPRET before importing medusa_lora.kernels; if triton was imported earlier without
it (conftest.py importing transformers does that), the Triton tests skip: set TRITON_INTERPRET=1 in the
environment or at the top of conftest.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_lora.kernels import pack_tree_mask, tree_attention_reference, unpack_tree_mask
from medusa_lora.kernels._triton import HAS_TRITON, interpreter_ready, is_interpreted
from medusa_lora.kernels.tree_attention import _tree_attn_fwd_kernel, tree_attention_triton

ON_GPU = HAS_TRITON and torch.cuda.is_available() and not is_interpreted(_tree_attn_fwd_kernel)
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    not (ON_GPU or interpreter_ready(_tree_attn_fwd_kernel)),
    reason="triton is missing, or it (or medusa_lora.kernels) was imported before TRITON_INTERPRET=1 "
    "was set: set TRITON_INTERPRET=1 in the environment or at the top of tests/conftest.py",
)

# (atol, rtol) of Triton vs the reference. fp16: the kernel rounds P to fp16 before P @ V and the output
# to fp16 (~1e-3 relative); the reference rounds once, from fp32.
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
# bf16 runs compiled on CUDA only: the interpreter mis-computes bf16 (bf16 keeps 8 mantissa bits: ~4e-3 each
# rounding, and the kernel rounds P and the output)
HALF = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


def random_tree_mask(tree_len: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask of a random tree with parent[i] < i (token 0 is the root)."""
    mask = torch.eye(tree_len, dtype=torch.bool)
    for i in range(1, tree_len):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        mask[i] |= mask[parent]
    return mask


def make_inputs(batch, q_heads, kv_heads, prefix_len, tree_len, head_dim, dtype, seed=0):
    """q, k, v as transformers passes them: (B, H, S, D) views of (B, S, H, D) storage; plus the tree mask."""
    gen = torch.Generator().manual_seed(seed)
    seq = prefix_len + tree_len
    q = torch.randn(batch, tree_len, q_heads, head_dim, generator=gen).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).transpose(1, 2)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).transpose(1, 2)
    mask = random_tree_mask(tree_len, gen)
    return (*(x.to(DEVICE, dtype) for x in (q, k, v)), mask.to(DEVICE))


def eager_attention(q, k, v, mask, scale):
    """Naive float64 attention with a dense (T, P + T) bool mask built from the unpacked tree mask."""
    tree_len, prefix_len = q.shape[2], k.shape[2] - q.shape[2]
    dense = torch.cat([mask.new_ones(tree_len, prefix_len), mask], dim=1)
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~dense, float("-inf")).softmax(-1) @ v


# ---- packed masks ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(tree_len=st.integers(1, 130), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(tree_len, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(tree_len, tree_len, generator=gen) < density
    bits = pack_tree_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (tree_len, -(-tree_len // 32))
    assert torch.equal(unpack_tree_mask(bits, tree_len), mask)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), tree_len=st.integers(1, 128))
def test_pack_sets_exactly_bit_j_mod_32_of_word_j_div_32(data, tree_len):
    i = data.draw(st.integers(0, tree_len - 1))
    j = data.draw(st.integers(0, tree_len - 1))
    mask = torch.zeros(tree_len, tree_len, dtype=torch.bool)
    mask[i, j] = True
    expected = torch.zeros(tree_len, -(-tree_len // 32), dtype=torch.int64)
    expected[i, j // 32] = 1 << (j % 32)
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32)  # bit 31: sign bit
    assert torch.equal(pack_tree_mask(mask), expected)


def test_pack_rejects_non_square_or_non_bool():
    with pytest.raises(ValueError):
        pack_tree_mask(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        pack_tree_mask(torch.ones(3, 3))


# ---- reference ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_heads,kv_heads,prefix_len,tree_len,head_dim,dtype",
    [
        (4, 4, 0, 1, 64, torch.float32),
        (3, 1, 37, 26, 64, torch.float32),
        (8, 2, 300, 64, 128, torch.float32),
        (4, 1, 5, 33, 96, torch.float16),
    ],
)
def test_reference_matches_eager(q_heads, kv_heads, prefix_len, tree_len, head_dim, dtype):
    q, k, v, mask = make_inputs(2, q_heads, kv_heads, prefix_len, tree_len, head_dim, dtype)
    scale = head_dim**-0.5
    out = tree_attention_reference(q, k, v, pack_tree_mask(mask), scale)
    assert out.dtype == dtype and out.shape == q.shape
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.double(), eager_attention(q, k, v, mask, scale), atol=atol, rtol=atol)


def test_reference_respects_the_tree_mask():
    """Changing a tree token's value changes its own output but not that of tokens it is no ancestor of."""
    q, k, v, _ = make_inputs(1, 2, 1, 4, 3, 16, torch.float32)
    mask = torch.tensor(
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device=DEVICE
    )  # 1, 2 children of 0
    bits = pack_tree_mask(mask)
    base = tree_attention_reference(q, k, v, bits, 0.25)
    v2 = v.clone()
    v2[:, :, 4 + 1] += 1.0  # tree token 1
    out = tree_attention_reference(q, k, v2, bits, 0.25)
    torch.testing.assert_close(out[:, :, [0, 2]], base[:, :, [0, 2]])
    assert not torch.allclose(out[:, :, 1], base[:, :, 1])


def test_reference_rejects_bad_shapes():
    q, k, v, mask = make_inputs(1, 3, 2, 4, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention_reference(q, k, v, pack_tree_mask(mask), 0.25)
    q, k, v, mask = make_inputs(1, 2, 2, 4, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="tree_bits"):
        tree_attention_reference(q, k, v, pack_tree_mask(mask[:4, :4]), 0.25)


# ---- Triton kernel --------------------------------------------------------------------------------------


def check_triton(batch, q_heads, kv_heads, prefix_len, tree_len, head_dim, dtype, num_splits=None, seed=0):
    q, k, v, mask = make_inputs(batch, q_heads, kv_heads, prefix_len, tree_len, head_dim, dtype, seed)
    bits = pack_tree_mask(mask)
    out = tree_attention_triton(q, k, v, bits, head_dim**-0.5, num_splits=num_splits)
    expected = tree_attention_reference(q, k, v, bits, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("tree_len", [1, 7, 26, 64])
@pytest.mark.parametrize("prefix_len", [0, 1, 37, 300])
def test_triton_prefix_by_tree_grid(prefix_len, tree_len, dtype):
    """Full prefix x tree grid at one head config (GQA 2, head dim 64)."""
    check_triton(1, 4, 2, prefix_len, tree_len, 64, dtype, seed=prefix_len * 131 + tree_len)


@needs_triton
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(2, 2), (6, 2), (4, 1)])
@pytest.mark.parametrize("prefix_len,tree_len", [(37, 26), (300, 7)])
@pytest.mark.parametrize("dtype", HALF)
def test_triton_head_dims_and_gqa(prefix_len, tree_len, q_heads, kv_heads, head_dim, dtype):
    check_triton(1, q_heads, kv_heads, prefix_len, tree_len, head_dim, dtype)


@needs_triton
@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,prefix_len,tree_len,head_dim",
    [(2, 3, 1, 37, 128, 64), (1, 2, 1, 64, 100, 32), (2, 2, 2, 130, 33, 16)],
)
def test_triton_large_trees_batch_and_small_head_dims(
    batch, q_heads, kv_heads, prefix_len, tree_len, head_dim
):
    check_triton(batch, q_heads, kv_heads, prefix_len, tree_len, head_dim, torch.float32)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_triton_split_kv(num_splits):
    """Split-KV over 7 full prefix blocks (64 keys each) plus a partial one, merged by the combine kernel."""
    check_triton(1, 4, 2, 7 * 64 + 20, 26, 64, torch.float32, num_splits=num_splits)


@needs_triton
def test_triton_split_kv_fp16():
    check_triton(2, 6, 2, 5 * 64, 7, 96, torch.float16, num_splits=4)


@needs_triton
def test_triton_contiguous_inputs():
    q, k, v, mask = make_inputs(1, 4, 2, 37, 7, 64, torch.float32)
    bits = pack_tree_mask(mask)
    out = tree_attention_triton(q.contiguous(), k.contiguous(), v.contiguous(), bits, 0.125)
    torch.testing.assert_close(out, tree_attention_triton(q, k, v, bits, 0.125))
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, bits, 0.125), atol=2e-5, rtol=1e-4)
