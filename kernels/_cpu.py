"""The CPU extension (``csrc/``: low-bit matmuls, a row-exact LoRA update, rotary embedding, tree attention,
a decoder's layers for one step),
compiled for this CPU on first use.

Built with ``-O3 -march=native`` by ``torch.utils.cpp_extension`` and cached under ``~/.cache/medusa-lora/extensions``
(``$MEDUSA_LORA_HOME/extensions``), keyed by the sources, torch's version, the target and the CPU's flags (a cache
carried to another CPU builds again). ``MEDUSA_LORA_CPU_KERNELS=0`` turns it off: torch's
kernels run instead. Importing this module builds nothing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / name
    for name in (
        "module.cpp",
        "lowbit_matmul.cpp",
        "lora_add.cpp",
        "rotary.cpp",
        "tree_attention.cpp",
        "decoder_layers.cpp",
    )
)
HEADERS = (CSRC / "vec.h",)
ENV_VAR = "MEDUSA_LORA_CPU_KERNELS"


@dataclass(frozen=True)
class Build:
    """A compiled extension and what it cost: ``module`` None when it could not be built (``reason`` says why)."""

    module: ModuleType | None
    seconds: float = 0.0
    reason: str = ""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    """Under the cache root the demo model uses too: ``$MEDUSA_LORA_HOME``, else ``~/.cache/medusa-lora``."""
    root = os.environ.get("MEDUSA_LORA_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "medusa-lora"
    )
    return Path(root).expanduser() / "extensions"


@functools.cache
def build(march: str = "native") -> Build:
    """Compile (or load from the cache) the extension for ``-march=march``; never raises."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return Build(None, reason=f"no CPU kernels for {platform.machine()}")
    digest = hashlib.sha256()
    for part in [*(s.read_bytes() for s in SOURCES + HEADERS), torch.__version__.encode(), march.encode()]:
        digest.update(part + b"\0")
    digest.update(_cpu_flags().encode())
    key = digest.hexdigest()[:16]
    directory = _cache_dir() / f"cpu-{key}"
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        module = load(
            name=f"medusa_lora_cpu_{key}",
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", f"-march={march}", "-fopenmp", f"-I{CSRC}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError, ValueError) as error:  # no compiler or ninja, a failed build
        return Build(None, reason=f"the CPU kernels did not build: {str(error).splitlines()[0][:300]}")
    seconds = time.perf_counter() - start
    if seconds > 5:
        logger.info("built the CPU kernels (%s) in %.0f s, cached in %s", module.isa(), seconds, directory)
    return Build(module, seconds)


def extension() -> ModuleType | None:
    """The extension for this CPU, or None (turned off, not x86, or not buildable: the reason is logged once)."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    built = build()
    if built.module is None:
        _warn_once(built.reason)
    return built.module


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning("%s; torch's kernels run instead", reason)


def describe() -> str:
    """What the CPU kernels run on here, for reports: "cpu kernels avx512_vnni", or why none run."""
    module = extension()
    if module is not None:
        return f"cpu kernels {module.isa()}"
    return (
        "cpu kernels off"
        if os.environ.get(ENV_VAR, "1") == "0"
        else f"cpu kernels unavailable: {build().reason}"
    )
