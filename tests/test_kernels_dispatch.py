"""Backend choice: MEDUSA_LORA_KERNELS forcing, its validation, and routing of the public ops.

See test_kernels_tree_attention.py for why TRITON_INTERPRET is set before importing medusa_lora.kernels.
"""

import importlib
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from medusa_lora import kernels
from medusa_lora.kernels import _cpu
from medusa_lora.kernels._triton import HAS_TRITON, interpreter_ready
from medusa_lora.kernels.tree_attention import _tree_attn_fwd_kernel

dispatch = importlib.import_module("medusa_lora.kernels.dispatch")
needs_interpreter = pytest.mark.skipif(
    not interpreter_ready(_tree_attn_fwd_kernel),
    reason="triton was imported before TRITON_INTERPRET=1 was set",
)


def tree_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 32, generator=gen)
    k = torch.randn(1, 2, 12, 32, generator=gen)
    v = torch.randn(1, 2, 12, 32, generator=gen)
    return q, k, v, kernels.pack_tree_mask(torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("value", ["reference", "triton"])
def test_env_var_forces_backend(monkeypatch, value):
    monkeypatch.setenv("MEDUSA_LORA_KERNELS", value)
    assert kernels.kernel_backend() == value
    assert kernels.kernel_backend(torch.device("cpu")) == value


@pytest.mark.parametrize("value", ["cuda", "Triton", "auto"])
def test_invalid_env_var_names_variable_and_allowed_values(monkeypatch, value):
    monkeypatch.setenv("MEDUSA_LORA_KERNELS", value)
    with pytest.raises(ValueError, match=r"MEDUSA_LORA_KERNELS.*reference, triton"):
        kernels.kernel_backend()
    with pytest.raises(ValueError, match="MEDUSA_LORA_KERNELS"):
        kernels.tree_attention(*tree_inputs(), 0.2)


def test_automatic_choice(monkeypatch):
    monkeypatch.delenv("MEDUSA_LORA_KERNELS", raising=False)
    cpu = "cpu" if _cpu.extension() is not None else "reference"  # the CPU extension where it builds
    assert kernels.kernel_backend(torch.device("cpu")) == cpu
    assert kernels.kernel_backend("cuda") == ("triton" if HAS_TRITON else "reference")
    assert kernels.kernel_backend() == ("triton" if HAS_TRITON and torch.cuda.is_available() else "reference")


@pytest.mark.parametrize(
    "value,expected", [("reference", "tree_attention_reference"), ("triton", "tree_attention_triton")]
)
def test_tree_attention_routes_to_backend(monkeypatch, value, expected):
    monkeypatch.setenv("MEDUSA_LORA_KERNELS", value)
    calls = []
    for name in ("tree_attention_reference", "tree_attention_triton"):
        monkeypatch.setattr(dispatch, name, lambda *args, name=name: calls.append(name))
    kernels.tree_attention(*tree_inputs(), 0.2)
    assert calls == [expected]


@pytest.mark.parametrize(
    "value,expected", [("reference", "compact_kv_reference"), ("triton", "compact_kv_triton")]
)
def test_compact_kv_routes_to_backend(monkeypatch, value, expected):
    monkeypatch.setenv("MEDUSA_LORA_KERNELS", value)
    calls = []
    for name in ("compact_kv_reference", "compact_kv_triton"):
        monkeypatch.setattr(dispatch, name, lambda *args, name=name: calls.append(name))
    kernels.compact_kv([torch.zeros(1, 1, 4, 8)], [torch.zeros(1, 1, 4, 8)], 1, torch.tensor([0, 2]))
    assert calls == [expected]


@needs_interpreter
def test_forced_triton_runs_on_cpu_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("MEDUSA_LORA_KERNELS", "triton")
    q, k, v, bits = tree_inputs()
    expected = kernels.tree_attention_reference(q, k, v, bits, 0.2)
    torch.testing.assert_close(kernels.tree_attention(q, k, v, bits, 0.2), expected, atol=2e-5, rtol=1e-4)
    keys, values = [k.clone()], [v.clone()]
    kernels.compact_kv(keys, values, 7, torch.tensor([0, 2, 3]))
    assert torch.equal(keys[0][:, :, 7:10], k[:, :, [7, 9, 10]])
    assert torch.equal(values[0][:, :, 7:10], v[:, :, [7, 9, 10]])


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_forced_triton_on_cpu_without_interpreter_raises_clearly():
    code = (
        "import torch, medusa_lora.kernels as k\n"
        "q = torch.zeros(1, 1, 2, 16); kv = torch.zeros(1, 1, 3, 16)\n"
        "k.tree_attention(q, kv, kv, k.pack_tree_mask(torch.ones(2, 2, dtype=torch.bool)), 1.0)\n"
    )
    env = {**os.environ, "MEDUSA_LORA_KERNELS": "triton"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "TRITON_INTERPRET=1" in result.stderr
