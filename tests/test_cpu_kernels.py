"""The CPU extension's ops beside their references, over many shapes: low-bit matmuls (native build and the
AVX2 build, which must agree bit for bit), tree attention, rotary embedding and the LoRA update; and the property
the lean forward's exactness rests on: a row's result does not depend on the other rows of the call."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from medusa_lora.kernels import _cpu, pack_tree_mask, tree_attention_reference
from medusa_lora.kernels import lowbit_matmul as lowbit
from medusa_lora.kernels.lora_add import lora_add_, lora_add_many_, lora_add_reference, pack_b, unpack_b
from medusa_lora.kernels.rotary import rotary_, rotary_reference
from medusa_lora.kernels.tree_attention import tree_attention_cpu

pytestmark = pytest.mark.skipif(_cpu.extension() is None, reason="the CPU extension does not build here")

MATMUL_SHAPES = [(16, 32), (32, 64), (48, 96), (576, 576), (192, 576), (1536, 576), (576, 1536)]
ROWS = [1, 2, 5, 6, 7, 13, 33]


def _int4_weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3).half()
    mins = (-torch.rand(n, k // 32, generator=g) * 0.1).half()
    return q, scales, mins


def _int8_weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return q, (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half()


def _close(y: torch.Tensor, expected: torch.Tensor, share: float) -> None:
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=share * expected.abs().max().item())


@pytest.mark.parametrize(("n", "k"), MATMUL_SHAPES)
def test_packing_round_trips(n, k):
    q, scales, _ = _int4_weight(n, k, 0)
    assert torch.equal(lowbit.unpack_int4(lowbit.pack_int4(q)), q)
    assert torch.equal(lowbit.unpack_scales(lowbit.pack_scales(scales)), scales)
    q8, _ = _int8_weight(n, k, 0)
    assert torch.equal(lowbit.unpack_int8(lowbit.pack_int8(q8)), q8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "k"), MATMUL_SHAPES)
@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_lowbit_matmul_equals_its_reference_and_rows_stand_alone(bits, n, k, dtype):
    if not lowbit.supports(bits, n, k):
        pytest.skip(f"no {bits} kernel on this CPU")
    torch.manual_seed(n + k)
    if bits == "int4":
        q, scales, mins = _int4_weight(n, k, 1)
        packed = (lowbit.pack_int4(q), lowbit.pack_scales(scales), lowbit.pack_scales(mins))
        run = lambda x: lowbit.int4_matmul(x, *packed)
    else:
        q, scales = _int8_weight(n, k, 1)
        mins = None
        packed = (lowbit.pack_int8(q), lowbit.pack_scales(scales))
        run = lambda x: lowbit.int8_matmul(x, *packed)
    for m in ROWS:
        x = torch.randn(m, k).to(dtype)
        y = run(x)
        assert y.shape == (m, n) and y.dtype == dtype
        expected = lowbit.lowbit_matmul_reference(
            x, q, scales.float(), None if mins is None else mins.float()
        )
        _close(y, expected, 1e-5 if dtype == torch.float32 else 1e-2)
        alone = torch.cat([run(x[i : i + 1]) for i in range(m)])
        assert torch.equal(alone, y)  # bit for bit, whatever the number of rows


def test_activation_rounding_is_eight_bits_per_group():
    """The reference's activations: every group of 32 within half a step (max|x| / 127 / 2) of x."""
    x = torch.randn(7, 96) * torch.logspace(-3, 2, 96)
    codes, scales, sums = lowbit.quantize_activations_reference(x)
    rebuilt = (codes.float().unflatten(-1, (-1, 32)) * scales[..., None]).flatten(-2)
    step = scales.repeat_interleave(32, dim=1)
    assert ((rebuilt - x).abs() <= step / 2 + 1e-6 * x.abs()).all()
    torch.testing.assert_close(sums, x.unflatten(-1, (-1, 32)).sum(-1))


def test_the_avx2_build_computes_what_the_native_one_does():
    """Where the CPU has AVX-512 VNNI the native build runs it; the AVX2 build runs here too and must give the
    same bits for int4, int8 and tree attention (the same integer dot products, the same float operations per
    lane, whatever the register width)."""
    native = _cpu.extension()
    if native.isa() != "avx512_vnni":
        pytest.skip(f"the native build is already {native.isa()}")
    avx2 = _cpu.build("x86-64-v3").module
    if avx2 is None or avx2.isa() != "avx2":
        pytest.skip("the AVX2 build did not build or run here")
    q, scales, mins = _int4_weight(576, 1536, 2)
    packed = ([lowbit.pack_int4(q)], [lowbit.pack_scales(scales)], [lowbit.pack_scales(mins)])
    q8, scales8 = _int8_weight(576, 1536, 3)
    packed8 = ([lowbit.pack_int8(q8)], [lowbit.pack_scales(scales8)])
    for m in (1, 4, 10):
        x = torch.randn(m, 1536)
        assert torch.equal(avx2.int4_matmul(x, *packed)[0], native.int4_matmul(x, *packed)[0])
        assert torch.equal(avx2.int8_matmul(x, *packed8)[0], native.int8_matmul(x, *packed8)[0])
    for t, d in ((1, 64), (7, 64), (5, 32), (3, 72)):
        q, k, v = torch.randn(1, 9, t, d), torch.randn(1, 3, 90 + t, d), torch.randn(1, 3, 90 + t, d)
        bits = pack_tree_mask(_tree_mask(t, d))
        assert torch.equal(
            avx2.tree_attention(q, k, v, bits, 90, 0.125), native.tree_attention(q, k, v, bits, 90, 0.125)
        )


ATTENTION_SHAPES = [  # B, Hq, Hkv, T, P, D
    (1, 9, 3, 10, 300, 64),
    (1, 4, 4, 1, 17, 32),
    (2, 8, 2, 5, 0, 48),
    (1, 9, 3, 40, 100, 64),  # two words of tree bits
    (1, 4, 2, 3, 20, 8),
    (1, 2, 1, 7, 33, 72),  # D not a multiple of 16
]


def _tree_mask(t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    mask = torch.eye(t, dtype=torch.bool)
    for i in range(1, t):
        mask[i] |= mask[parents[i]]
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_tree_attention_equals_its_reference(shape, dtype):
    b, hq, hkv, t, p, d = shape
    torch.manual_seed(t + p)
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, p + t, d), torch.randn(b, hkv, p + t, d)
    bits = pack_tree_mask(_tree_mask(t, p))
    expected = tree_attention_reference(q, k, v, bits, d**-0.5)
    out = tree_attention_cpu(q.to(dtype), k.to(dtype), v.to(dtype), bits, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance)


def test_a_tree_row_equals_the_same_token_decoded_alone():
    """Row t of a tree step over (prefix, its ancestors, itself) = a one-token step over those keys, in order."""
    torch.manual_seed(0)
    t, p, d = 12, 50, 64
    q, k, v = torch.randn(1, 6, t, d), torch.randn(1, 2, p + t, d), torch.randn(1, 2, p + t, d)
    mask = _tree_mask(t, 3)
    tree = tree_attention_cpu(q, k, v, pack_tree_mask(mask), 0.125)
    for row in range(t):
        keys = torch.tensor(list(range(p)) + [p + j for j in range(t) if mask[row, j]])
        one = torch.ones(1, 1, dtype=torch.int32)
        alone = tree_attention_cpu(q[:, :, row : row + 1], k[:, :, keys], v[:, :, keys], one, 0.125)
        assert torch.equal(tree[:, :, row : row + 1], alone), row


@pytest.mark.parametrize(("t", "h", "d"), [(1, 9, 64), (10, 3, 64), (5, 4, 8), (33, 2, 80)])
def test_rotary_equals_transformers_bit_for_bit(t, h, d):
    torch.manual_seed(t)
    x = torch.randn(1, t, h, d)
    cos, sin = torch.randn(1, t, d), torch.randn(1, t, d)
    ours = torch.empty(1, h, t, d)
    rotary_(ours, x, cos, sin)
    theirs, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, rotary_reference(x, cos, sin))
    cache = torch.zeros(1, h, t + 7, d)  # written into a strided slice, as into the cache
    rotary_(cache[:, :, 3 : 3 + t], x, cos, sin)
    assert torch.equal(cache[:, :, 3 : 3 + t], theirs) and not cache[:, :, :3].any()


@pytest.mark.parametrize(
    ("n", "k", "r"), [(576, 576, 16), (192, 576, 8), (1536, 576, 4), (64, 96, 3), (40, 96, 5), (7, 33, 1)]
)
def test_lora_update_equals_its_reference_and_rows_stand_alone(n, k, r):
    torch.manual_seed(r)
    a, b = torch.randn(r, k) * 0.05, pack_b(torch.randn(n, r) * 0.05)
    x, y = torch.randn(9, k), torch.randn(9, n)
    expected = lora_add_reference(y.clone(), x, a, b)
    ours = lora_add_(y.clone(), x, a, b)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    alone = torch.cat([lora_add_(y[i : i + 1].clone(), x[i : i + 1], a, b) for i in range(9)])
    assert torch.equal(alone, ours)


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_lora_update_does_not_depend_on_the_thread_count(rows):
    """Its work is split over threads by whole tiles and panels, even for one token (a fork pays off there)."""
    torch.manual_seed(rows)
    a, b = torch.randn(16, 1536) * 0.05, pack_b(torch.randn(576, 16) * 0.05)
    x, y = torch.randn(rows, 1536), torch.randn(rows, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = lora_add_(y.clone(), x, a, b)
        torch.set_num_threads(max(threads, 2))
        parallel = lora_add_(y.clone(), x, a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)


def test_lora_update_of_no_rows_is_empty():
    a, b = torch.randn(16, 576), pack_b(torch.randn(576, 16))
    assert lora_add_(torch.zeros(0, 576), torch.zeros(0, 576), a, b).shape == (0, 576)


@pytest.mark.parametrize("n", [16, 40, 7])
def test_lora_b_panels_round_trip(n):
    b = torch.randn(n, 5)
    panels = pack_b(b)
    assert panels.shape == (-(-n // 16), 5, 16)
    assert torch.equal(unpack_b(panels, n), b)
    assert not panels.transpose(1, 2).reshape(-1, 5)[n:].any()  # zero past N


@pytest.mark.parametrize("rows", [1, 7])
def test_lora_updates_of_many_outputs_in_one_call_equal_one_call_each(rows):
    """q / k / v in one call, one output with two adapters (added in their order), one with none."""
    torch.manual_seed(rows)
    k = 96
    x = torch.randn(rows, k)
    shapes = [(64, [16]), (40, [8, 4]), (48, []), (32, [16])]  # (N, the ranks of its updates)
    ys = [torch.randn(rows, n) for n, _ in shapes]
    updates = [
        [(torch.randn(r, k) * 0.05, pack_b(torch.randn(n, r) * 0.05)) for r in ranks] for n, ranks in shapes
    ]
    fused = lora_add_many_([y.clone() for y in ys], x, updates)
    for y, per_y, ours in zip(ys, updates, fused):
        one_by_one = y.clone()
        for a, b in per_y:
            lora_add_(one_by_one, x, a, b)
        assert torch.equal(ours, one_by_one)
        reference = y.clone()
        for a, b in per_y:
            lora_add_reference(reference, x, a, b)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 outputs but 4 lists"):
        lora_add_many_(ys[:3], x, updates)
