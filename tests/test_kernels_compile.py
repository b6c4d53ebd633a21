"""Every Triton kernel compiles to a cubin for sm_80 (A100) and sm_90 (H100) and fits their shared memory,
without a GPU: `triton.compile` runs Triton's whole pipeline down to ptxas, which ships in the triton wheel.

The cases use the launch configurations the launchers choose (`fwd_launch_config`, `combine_launch_config`,
`compact_kv.launch_config`) for the dtypes (fp16, bf16, fp32) and head dims (16 to 128) we support: the
largest tiles (head dim 128, BLOCK_M 64, the longest path, the most splits) in every dtype on both
targets, plus the small-tile, unsplit and masked-head-dim (96) variants.

tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines, and an interpreted kernel cannot be compiled,
so the compiles run in a subprocess without that variable (this file run as a script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from medusa_lora.kernels._triton import HAS_TRITON
from medusa_lora.kernels.compact_kv import launch_config as compact_launch_config
from medusa_lora.kernels.tree_attention import combine_launch_config, fwd_launch_config

# Max dynamic shared memory per block: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _fwd(arch: int, dtype: str, group: int, tree_len: int, head_dim: int, split: bool) -> dict[str, Any]:
    config = fwd_launch_config(group, tree_len, head_dim, DTYPES[dtype])
    part = "*fp32" if split else f"*{dtype}"  # unsplit, the launcher passes `out` for both partials
    signature = {name: f"*{dtype}" for name in ("Q", "K", "V", "Out")}
    signature |= {"Bits": "*i32", "OPart": part, "LsePart": part}
    for name in ("qb", "qh", "qt", "qd", "kb", "kh", "ks", "kd", "vb", "vh", "vs", "vd"):
        signature[f"stride_{name}"] = "i32"
    signature |= dict.fromkeys(("num_words", "prefix_len", "tree_len", "num_kv_heads"), "i32")
    signature |= {"qk_scale": "fp32", "blocks_per_split": "i32"}
    constexprs = {"GROUP": group, "HEAD_DIM": head_dim, "SPLIT": split}
    return _case("_tree_attn_fwd_kernel", arch, dtype, signature, constexprs, config)


def _combine(arch: int, dtype: str, num_splits: int, head_dim: int) -> dict[str, Any]:
    signature = {
        "OPart": "*fp32",
        "LsePart": "*fp32",
        "Out": f"*{dtype}",
        "num_rows": "i32",
        "num_splits": "i32",
    }
    config = combine_launch_config(num_splits, head_dim)
    return _case("_tree_attn_combine_kernel", arch, dtype, signature, {"HEAD_DIM": head_dim}, config)


def _compact(arch: int, dtype: str, num_accepted: int, head_dim: int) -> dict[str, Any]:
    signature = {"Table": "*i64", "Accepted": "*i64", "Ref": f"*{dtype}"}
    signature |= dict.fromkeys(("prefix_len", "num_accepted", "num_heads", "head_dim"), "i32")
    config = compact_launch_config(num_accepted, head_dim)
    return _case("_compact_kv_kernel", arch, dtype, signature, {}, config)


def _case(
    kernel: str, arch: int, dtype: str, signature: dict, constexprs: dict, config: dict
) -> dict[str, Any]:
    constexprs = constexprs | {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    options = {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}
    name = f"{kernel}-sm{arch}-{dtype}-" + "-".join(f"{k}={v}" for k, v in {**constexprs, **options}.items())
    return {
        "id": name,
        "kernel": kernel,
        "arch": arch,
        "signature": signature | dict.fromkeys(constexprs, "constexpr"),
        "constexprs": constexprs,
        "options": options,
    }


def cases() -> list[dict[str, Any]]:
    out = []
    for arch in SHARED_LIMIT:
        for dtype in DTYPES:
            out.append(_fwd(arch, dtype, group=4, tree_len=64, head_dim=128, split=True))  # the largest tiles
            out.append(_compact(arch, dtype, num_accepted=128, head_dim=128))  # the longest path
        out.append(_fwd(arch, "fp16", group=1, tree_len=7, head_dim=64, split=False))  # small tiles, unsplit
        out.append(_compact(arch, "bf16", num_accepted=5, head_dim=64))
    # the merge kernel's tile depends on the split count only; its dtype only on the final store
    for arch, dtype in ((80, "bf16"), (90, "fp16"), (90, "fp32")):
        out.append(_combine(arch, dtype, num_splits=132, head_dim=128))  # one split per H100 SM
    out.append(_fwd(90, "bf16", group=3, tree_len=26, head_dim=96, split=False))  # masked head dim
    out.append(_fwd(80, "fp32", group=1, tree_len=1, head_dim=16, split=True))  # the smallest dot
    return out


def compile_case(case: dict[str, Any]) -> dict[str, Any]:
    """Compile one case (in a process without TRITON_INTERPRET); its cubin size and shared memory."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.errors import TritonError

    module = "compact_kv" if case["kernel"] == "_compact_kv_kernel" else "tree_attention"
    kernel = getattr(importlib.import_module(f"medusa_lora.kernels.{module}"), case["kernel"])
    source = ASTSource(kernel, case["signature"], case["constexprs"])
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", case["arch"], 32), options=case["options"])
    except (TritonError, RuntimeError) as exc:  # reported per case by the test
        return {"id": case["id"], "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {
        "id": case["id"],
        "cubin": len(compiled.asm.get("cubin", b"")),
        "shared": compiled.metadata.shared,
        "seconds": round(time.perf_counter() - start, 1),
    }


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, Any]]:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    run = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {r["id"]: r for r in results}


@pytest.mark.parametrize("case", cases(), ids=lambda case: case["id"])
def test_kernel_compiles_to_a_cubin_that_fits_shared_memory(compiled, case):
    result = compiled[case["id"]]
    assert "error" not in result, result.get("error")
    assert result["cubin"] > 0
    assert result["shared"] <= SHARED_LIMIT[case["arch"]], f"{result['shared']} bytes of shared memory"


if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for result in pool.map(compile_case, cases()):
            print(json.dumps(result), flush=True)
