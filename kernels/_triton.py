"""Optional Triton import, so `medusa_lora.kernels` imports (reference path only) where triton is missing.

Kernel modules use `from __future__ import annotations`, so `tl.constexpr` annotations stay strings and
need no `tl` at import time; Triton reads such string annotations itself.

Whether a jit function is compiled or interpreted is fixed when it is decorated, i.e. when its module is
imported; that holds for triton.language's own helpers too. So to run kernels on CPU tensors, set
`TRITON_INTERPRET=1` before anything imports triton (transformers may) or `medusa_lora.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None


def jit(fn: Callable) -> Any:
    """`triton.jit(fn)`; without triton the plain function, which `check_launchable` never lets run."""
    return triton.jit(fn) if HAS_TRITON else fn


def is_interpreted(fn: Any) -> bool:
    """True when the jit function `fn` was decorated under `TRITON_INTERPRET=1` (runs on the host)."""
    return HAS_TRITON and not isinstance(fn, triton.runtime.JITFunction)


def interpreter_ready(kernel: Any) -> bool:
    """True when `kernel` can run in the interpreter: it and triton.language's own jit helpers (tl.sum, ...)
    were decorated under `TRITON_INTERPRET=1`, i.e. the flag was set before triton was first imported."""
    return is_interpreted(kernel) and is_interpreted(tl.sum)


def check_launchable(kernel: Any, tensor: torch.Tensor) -> None:
    """Raise a clear RuntimeError when `kernel` cannot run on `tensor`'s device."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use MEDUSA_LORA_KERNELS=reference")
    if not tensor.is_cuda and not interpreter_ready(kernel):
        raise RuntimeError(
            "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before triton and "
            "medusa_lora.kernels are first imported"
        )
