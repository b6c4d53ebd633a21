"""for_inference(): LoRA merged and oneDNN pre-packed linears give the same logits, and the same greedy output
as transformers' generate on the prepared model."""

from __future__ import annotations

import gc
import random

import pytest
import torch
from peft import LoraConfig
from torch import nn

from medusa_lora.decoding import generate
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.heads import PATH_TABLES
from medusa_lora.model.inference import (
    PackedLinear,
    for_inference,
    freeze_gc,
    prepack_linears,
    prepack_supported,
)
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import default_tree

from conftest import TINY_VOCAB, randomize_heads, tiny_llama, tiny_qwen2
from test_generation import hf_greedy, random_prompt

needs_prepack = pytest.mark.skipif(
    not prepack_supported(torch.zeros(1)), reason="no oneDNN linear pre-packing on this build/device"
)


@needs_prepack
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 33])
@pytest.mark.parametrize(
    ("d_in", "d_out", "bias"), [(64, 64, False), (64, 200, True), (96, 17, True), (5, 64, False)]
)
def test_packed_linear_equals_linear(rows, d_in, d_out, bias):
    torch.manual_seed(rows * 1000 + d_in + d_out)
    linear = nn.Linear(d_in, d_out, bias=bias)
    packed = PackedLinear(linear)
    for shape in ((rows, d_in), (1, rows, d_in), (2, rows, d_in)):
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is linear.weight and packed.bias is linear.bias  # readable as before


@needs_prepack
def test_packed_linear_refuses_autograd():
    packed = PackedLinear(nn.Linear(8, 8))
    with pytest.raises(RuntimeError, match="inference"):
        packed(torch.randn(2, 8, requires_grad=True))


@needs_prepack
def test_prepack_replaces_every_linear_and_keeps_tied_weights():
    base = tiny_llama()
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    linears = sum(type(m) is nn.Linear for m in base.modules())
    assert prepack_linears(base) == linears > 0
    assert not any(type(m) is nn.Linear for m in base.modules())
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    assert prepack_linears(base) == 0  # idempotent


def test_prepack_leaves_unsupported_dtypes_alone():
    layer = nn.Sequential(nn.Linear(4, 4).to(torch.float64))
    assert prepack_linears(layer) == 0 and type(layer[0]) is nn.Linear


@pytest.mark.parametrize("prepack", [False, pytest.param(True, marks=needs_prepack)])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_prepared_model_keeps_logits_and_greedy_output(factory, prepack):
    base = factory()
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3), lora)
    randomize_heads(model, seed=1)
    rng = random.Random(0)
    prompts = [random_prompt(rng) for _ in range(3)]
    with torch.inference_mode():
        before = [model(torch.tensor([p])).logits for p in prompts]
        heads_before = model.heads(model.hidden_states(torch.tensor([prompts[0]])), model.lm_head)
    prepared = for_inference(model, prepack=prepack)
    assert not prepared.has_lora
    assert any(isinstance(m, PackedLinear) for m in prepared.modules()) == prepack
    with torch.inference_mode():
        for prompt, logits in zip(prompts, before):
            torch.testing.assert_close(prepared(torch.tensor([prompt])).logits, logits, rtol=1e-4, atol=1e-4)
        hidden = prepared.hidden_states(torch.tensor([prompts[0]]))
        assert prepared.heads.dtype == torch.float16  # the heads draft in fp16; the model verifies in fp32
        torch.testing.assert_close(
            prepared.heads(hidden, prepared.lm_head).float(), heads_before, rtol=1e-2, atol=2e-3
        )
    for prompt in prompts:
        expected = hf_greedy(prepared.base, prompt, 24)  # transformers' generate on the prepared model
        for tree in (default_tree(4, 3), default_tree(16, 3)):
            assert generate(prepared, prompt, max_new_tokens=24, tree=tree).tokens == expected
        assert generate(prepared, prompt, max_new_tokens=24, speculative=False).tokens == expected


def test_path_conditioned_heads_draft_in_fp16_over_a_draft_vocabulary():
    """An fp32 model's heads draft in fp16 after ``for_inference``: the kept path tables and output rows are
    fp16 too, the logits stay close to fp32's, and generation keeps transformers' greedy output."""
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4, path_conditioned=True))
    model.set_draft_vocab(torch.arange(0, TINY_VOCAB, 2))
    randomize_heads(model, seed=3)
    hidden, root = torch.randn(2, model.config.hidden_size), torch.tensor([7, 40])
    with torch.no_grad():
        in_fp32 = model.draft_logits(hidden, root)
    prepared = for_inference(model, prepack=False)
    with torch.no_grad():
        in_fp16 = prepared.draft_logits(hidden, root)
    assert in_fp16.dtype == torch.float16
    assert all(t.dtype == torch.float16 for t in prepared.heads._kept[PATH_TABLES][1])
    torch.testing.assert_close(in_fp16.float(), in_fp32, rtol=1e-2, atol=5e-3)
    prompt = random_prompt(random.Random(5))
    expected = hf_greedy(prepared.base, prompt, 24)
    assert generate(prepared, prompt, max_new_tokens=24, tree=default_tree(12, 4)).tokens == expected


def test_heads_keep_the_models_dtype_when_asked_or_when_already_narrow():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2))
    assert for_inference(model, prepack=False, draft_dtype=None).heads.dtype == torch.float32
    half = MedusaLoraModel.from_base(tiny_llama().to(torch.bfloat16), MedusaConfig(num_heads=2))
    assert half.heads.dtype == torch.bfloat16
    assert for_inference(half, prepack=False).heads.dtype == torch.bfloat16  # fp16 is no narrower
    bare = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2, num_layers=0))
    assert bare.heads.dtype is None  # no weights of their own: the LM head scores for them
    assert for_inference(bare, prepack=False).heads.dtype is None


def test_freeze_gc_moves_live_objects_out_of_the_collectors_reach():
    before = gc.get_freeze_count()  # an in-process eval main() may have frozen some already
    try:
        freeze_gc()
        assert gc.get_freeze_count() > max(before, 1000)  # at least the imported libraries' objects
        assert gc.get_count()[0] < 100  # it collected first: the young generation starts (almost) empty
    finally:
        gc.unfreeze()
