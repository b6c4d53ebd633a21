"""Micro-benchmarks of the kernels against torch baselines: `python -m medusa_lora.kernels.bench --help`.

On CUDA (bf16, Llama-7B-like GQA: 32 q heads, 8 kv heads, head dim 128, batch 1), per prefix x tree size:
  triton  tree_attention_triton
  sdpa    F.scaled_dot_product_attention with a dense additive float mask, K/V repeated to the q heads first
          (what transformers' sdpa path does when it is given a mask)
  eager   repeat K/V, matmul, + mask, fp32 softmax, matmul (transformers' eager path)
and compact_kv triton vs reference over all layers. Times are medians of triton.testing.do_bench, in us.
Without CUDA it says so and times the reference implementations on a small CPU shape, as a sanity check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON
from .compact_kv import compact_kv_reference, compact_kv_triton
from .tree_attention import pack_tree_mask, tree_attention_reference, tree_attention_triton

Timer = Callable[[Callable[[], object]], float]


def width_tree_mask(tree_len: int, width: int = 4) -> torch.Tensor:
    """A Medusa-like tree: `width` children per node, breadth-first, as an ancestor-or-self mask."""
    mask = torch.eye(tree_len, dtype=torch.bool)
    for i in range(1, tree_len):
        mask[i] |= mask[(i - 1) // width]
    return mask


def dense_float_mask(mask: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, P + T) additive mask: 0 where visible, -inf elsewhere."""
    visible = torch.cat([mask.new_ones(mask.shape[0], prefix_len), mask], dim=1)
    return torch.zeros(visible.shape, dtype=dtype, device=mask.device).masked_fill(~visible, float("-inf"))


def sdpa_attention(q, k, v, float_mask, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, scale=scale)


def eager_attention(q, k, v, float_mask, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + float_mask
    return torch.matmul(scores.float().softmax(-1).to(q.dtype), v)


def cuda_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def cpu_timer(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def tree_attention_row(args, prefix_len: int, tree_len: int, device, dtype, timer: Timer, names: list[str]):
    """Times of `names` (us) at one (prefix, tree) size, and max |diff| of names[0] to the fp32 reference."""
    seq = prefix_len + tree_len
    q = torch.randn(1, args.q_heads, tree_len, args.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, args.kv_heads, seq, args.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    mask = width_tree_mask(tree_len).to(device)
    bits, float_mask = pack_tree_mask(mask), dense_float_mask(mask, prefix_len, dtype)
    scale = args.head_dim**-0.5
    impls = {
        "triton": lambda: tree_attention_triton(q, k, v, bits, scale),
        "reference": lambda: tree_attention_reference(q, k, v, bits, scale),
        "sdpa": lambda: sdpa_attention(q, k, v, float_mask, scale),
        "eager": lambda: eager_attention(q, k, v, float_mask, scale),
    }
    gold = tree_attention_reference(q.float(), k.float(), v.float(), bits, scale)
    err = (impls[names[0]]().float() - gold).abs().max().item()
    return [timer(impls[name]) for name in names], err


def bench_tree_attention(args, device, dtype, timer: Timer, first: str) -> None:
    """A table over prefix x tree sizes: us per implementation, ratios to `first`, its max |diff|."""
    names = [first, "sdpa", "eager"]
    print(f"\ntree attention: B=1 Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} {dtype}, us")
    header = " ".join(f"{n:>9}" for n in names)
    ratios = f"{'sdpa/' + first:>13} {'eager/' + first:>14}"
    print(f"{'prefix':>7} {'tree':>5} {header} {ratios} {'max|diff|':>10}")
    # one untimed row first: the first timed row otherwise carries the GPU's clock ramp
    tree_attention_row(args, args.prefix[0], args.tree[0], device, dtype, timer, names)
    for prefix_len in args.prefix:
        for tree_len in args.tree:
            us, err = tree_attention_row(args, prefix_len, tree_len, device, dtype, timer, names)
            times = " ".join(f"{t:>9.1f}" for t in us)
            ratios = f"{us[1] / us[0]:>13.2f} {us[2] / us[0]:>14.2f}"
            print(f"{prefix_len:>7} {tree_len:>5} {times} {ratios} {err:>10.2e}")


def bench_compact_kv(args, device, dtype, timer: Timer, impls: dict[str, Callable]) -> None:
    prefix_len, tree_len = args.prefix[-1], max(args.tree)
    path = [0]  # first children down the width-4 tree: a typical 4-5 token acceptance
    while 4 * path[-1] + 1 < tree_len and len(path) < 5:
        path.append(4 * path[-1] + 1)
    accepted = torch.tensor(path, device=device)
    shape = (1, args.kv_heads, prefix_len + tree_len, args.head_dim)
    keys = [torch.randn(shape, device=device, dtype=dtype) for _ in range(args.layers)]
    values = [torch.randn(shape, device=device, dtype=dtype) for _ in range(args.layers)]
    print(
        f"\ncompact_kv: {args.layers} layers x (keys, values) {shape} {dtype}, path {accepted.tolist()}, us"
    )
    us = {name: timer(lambda fn=fn: fn(keys, values, prefix_len, accepted)) for name, fn in impls.items()}
    print("  ".join(f"{name} {t:.1f}" for name, t in us.items()))
    if len(us) == 2:
        print(f"reference/triton {us['reference'] / us['triton']:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prefix", type=int, nargs="+", default=[512, 2048, 8192], help="prefix lengths P")
    parser.add_argument("--tree", type=int, nargs="+", default=[16, 64], help="tree sizes T")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32, help="layers for compact_kv")
    args = parser.parse_args(argv)

    if torch.cuda.is_available() and HAS_TRITON:
        print(f"device: {torch.cuda.get_device_name()}")
        bench_tree_attention(args, "cuda", torch.bfloat16, cuda_timer, "triton")
        impls = {"triton": compact_kv_triton, "reference": compact_kv_reference}
        bench_compact_kv(args, "cuda", torch.bfloat16, cuda_timer, impls)
        return
    print(
        "CUDA with triton is not available: the Triton kernels are not timed (the interpreter is far "
        "too slow to mean anything). Sanity timing of the reference implementations on a small fixed "
        "fp32 CPU shape, single-threaded (--prefix/--tree/--q-heads/--kv-heads/--layers apply on CUDA only):"
    )
    torch.set_num_threads(1)  # thread spin-waits on a busy or shared CPU swamp these small shapes
    small = argparse.Namespace(
        prefix=[128, 512], tree=[16], q_heads=8, kv_heads=2, head_dim=args.head_dim, layers=4
    )
    bench_tree_attention(small, "cpu", torch.float32, cpu_timer, "reference")
    bench_compact_kv(small, "cpu", torch.float32, cpu_timer, {"reference": compact_kv_reference})


if __name__ == "__main__":
    main()
