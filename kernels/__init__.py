"""Kernels for Medusa tree verification: tree attention and in-place KV-cache compaction (torch references,
Triton kernels); weight-only int8 / int4 linear layers (``quantized_linear``); and the CPU extension (``_cpu``,
``csrc/``: low-bit matmuls, row-exact tree attention, rotary embedding, the LoRA update), each beside its reference.

`tree_attention` and `compact_kv` pick an implementation through `kernel_backend()` (override with
MEDUSA_LORA_KERNELS=reference|triton|cpu). Importing this package never requires triton or builds the extension.
"""


def _shadowed_spec():
    """The spec of the PyPI package `kernels` when this folder is imported under its name, else None."""
    import importlib.machinery
    import os
    import sys

    if __name__ != "kernels":
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    return importlib.machinery.PathFinder.find_spec("kernels", path)


# Imported as top-level `kernels`, a checkout's root is on sys.path (`python -m` / `-c` there) and this folder
# shadows the PyPI package `kernels`, which transformers >= 5.25 imports: load that one in our place.
if (_spec := _shadowed_spec()) is not None and _spec.loader is not None:
    import importlib.util
    import sys

    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .compact_kv import compact_kv_reference
    from .dispatch import compact_kv, kernel_backend, tree_attention
    from .tree_attention import pack_tree_mask, tree_attention_reference, unpack_tree_mask

    __all__ = [
        "compact_kv",
        "compact_kv_reference",
        "kernel_backend",
        "pack_tree_mask",
        "tree_attention",
        "tree_attention_reference",
        "unpack_tree_mask",
    ]
