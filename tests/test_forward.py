"""The fast forwards (``verification.forward``): on CUDA the static one (a static cache, fixed-shape steps, one
graph per step size), on a CPU the lean one (``lean_forward``: the CPU kernels, a preallocated cache). Greedy output
equals transformers' ``generate`` and the eager forward's, over model families, trees, drafters and LoRA adapters;
the lean step equals the eager one bit for bit; the graphs are captured once and reused. The CUDA tests run where a
GPU is (scripts/gpu_check.sh)."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from medusa_lora.decoding import generate
from medusa_lora.errors import ConfigError
from medusa_lora.kernels import _cpu
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import ROOT_ONLY, TokenTree, chain_tree, default_tree
from medusa_lora.trees.tuning import measure_step_costs
from medusa_lora.verification.forward import EagerForward, StaticForward, decoder_forward
from medusa_lora.verification.lean_forward import LeanForward, why_not_lean

from conftest import TINY_VOCAB, randomize_heads, tiny_llama, tiny_mistral, tiny_qwen2
from drafters import NoisyOracleDrafter
from test_generation import hf_greedy, random_prompt

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
TREES = (ROOT_ONLY, chain_tree(4), default_tree(16), default_tree(64))


def _models(factory, device):
    base = factory()
    plain = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    path = randomize_heads(
        MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4, path_conditioned=True)), 5
    )
    return base.to(device), [plain.to(device), path.to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
def test_fast_greedy_output_equals_transformers_generate(factory, device):
    rng = random.Random(1)
    base, models = _models(factory, device)
    for i in range(3):
        prompt = random_prompt(rng)
        expected = hf_greedy(base, prompt, 30)
        for model in models:
            for tree in TREES:
                out = generate(model, prompt, max_new_tokens=30, tree=tree, fast=True)
                assert out.tokens == expected, (i, tree.size)
        noisy = NoisyOracleDrafter(expected + [0] * 8, TINY_VOCAB, seed=i)
        out = generate(models[0], prompt, max_new_tokens=30, tree=default_tree(32), drafter=noisy, fast=True)
        assert out.tokens == expected
        assert out.stats.mean_accepted_length > 1.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_static_step_logits_equal_the_eager_step(device, seed):
    """Prefill, then a random tree scored after it, then the accepted path kept and another tree: the static
    forward's hidden states and logits equal the eager forward's at every step."""
    rng = random.Random(seed)
    model = MedusaLoraModel.from_base(tiny_llama(seed=seed).to(device), MedusaConfig(num_heads=4))
    prompt = torch.tensor([random_prompt(rng)], device=device)
    eager, static = EagerForward(model), StaticForward(model, 256, cuda_graphs=device == "cuda")
    with torch.inference_mode():
        for a, b in zip(eager.prefill(prompt), static.prefill(prompt)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        prefix = prompt.shape[1]
        for tree in (
            chain_tree(3),
            default_tree(8),
            TokenTree([(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]),
            ROOT_ONLY,
        ):
            tokens = torch.randint(0, TINY_VOCAB, (tree.size,), device=device)
            (h1, l1), (h2, l2) = eager.score(tokens, tree, prefix), static.score(tokens, tree, prefix)
            torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
            leaf = rng.randrange(tree.size)
            accepted = torch.tensor(
                [n for n in range(tree.size) if tree.tensors().mask[leaf, n]], device=device
            )
            eager.keep(prefix, accepted)
            static.keep(prefix, accepted)
            prefix += len(accepted)


needs_cpu_kernels = pytest.mark.skipif(
    _cpu.extension() is None, reason="the CPU extension does not build here"
)


class _OwnNorm(torch.nn.Module):
    """An RMSNorm of another formula: the lean forward's layers must call it, not transformers' formula."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * (1 + self.weight)


def _own_modules(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        layer.input_layernorm = _OwnNorm(layer.input_layernorm)
        layer.mlp.act_fn = torch.nn.GELU()
    return model


@needs_cpu_kernels
@pytest.mark.parametrize(
    "variant", ["merged", "unmerged", "int4", "int8", "own modules"]
)  # fp32 weights with the LoRA merged or beside them, int4, int8, another norm and activation
@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
def test_lean_step_equals_the_eager_step_bit_for_bit(factory, variant):
    """Prefill, random trees, compaction and one-token steps: the lean forward's hidden states and logits are the
    eager forward's, exactly, whichever way its layers run each linear, norm and activation."""
    from medusa_lora.model.inference import for_inference

    rng = random.Random(7)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    base = _own_modules(factory()) if variant == "own modules" else factory()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=2), lora)
    weights = variant if variant in ("int4", "int8") else None
    model = for_inference(model, weights=weights, merge=variant in ("merged", "own modules"))
    prompt = torch.tensor([random_prompt(rng)])
    eager, lean = EagerForward(model), LeanForward(model, 256)
    with torch.inference_mode():
        for a, b in zip(eager.prefill(prompt), lean.prefill(prompt)):
            assert torch.equal(a, b)
        prefix = prompt.shape[1]
        for tree in (
            chain_tree(3),
            default_tree(8),
            ROOT_ONLY,
            TokenTree([(0,), (1,), (0, 0), (1, 0)]),
            ROOT_ONLY,
        ):
            tokens = torch.randint(0, TINY_VOCAB, (tree.size,))
            (h1, l1), (h2, l2) = eager.score(tokens, tree, prefix), lean.score(tokens, tree, prefix)
            assert torch.equal(h1, h2) and torch.equal(l1, l2), tree.size
            leaf = rng.randrange(tree.size)
            accepted = torch.tensor([n for n in range(tree.size) if tree.tensors().mask[leaf, n]])
            eager.keep(prefix, accepted)
            lean.keep(prefix, accepted)
            prefix += len(accepted)
    with pytest.raises(ConfigError, match="do not fit the lean forward's cache of 256"):
        lean.score(torch.zeros(5, dtype=torch.long), chain_tree(4), 254)


@pytest.mark.parametrize("device", DEVICES)
def test_static_forward_is_reused_per_model_and_adapter_state(device):
    base = tiny_llama().to(device)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = MedusaLoraModel(lora, None, MedusaConfig(num_heads=4))
    first = decoder_forward(model, 100, fast=True)
    kind = StaticForward if device == "cuda" or _cpu.extension() is None else LeanForward
    assert isinstance(first, kind) and first.capacity == 512
    assert getattr(first, "cuda_graphs", False) == (device == "cuda")
    assert decoder_forward(model, 400, fast=True) is first  # the same capacity bucket
    with lora.disable_adapter():  # the base alone: other weights, so another forward (another set of graphs)
        assert decoder_forward(model, 100, fast=True) is not first
        base_out = generate(model, [1, 2, 3], 20, speculative=False, fast=True).tokens
        assert base_out == generate(model, [1, 2, 3], 20, speculative=False, fast=False).tokens
    assert decoder_forward(model, 100, fast=True) is first
    lora_out = generate(model, [1, 2, 3], 20, speculative=False, fast=True).tokens
    assert lora_out == generate(model, [1, 2, 3], 20, speculative=False, fast=False).tokens
    assert isinstance(decoder_forward(model, 100, fast=False), EagerForward)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_graphs_are_captured_once_per_step_size():
    model = MedusaLoraModel.from_base(tiny_llama().to("cuda"), MedusaConfig(num_heads=4))
    first = generate(model, [5, 6, 7], 40, tree=chain_tree(4))
    assert first.stats.capture_time_s > 0
    again = generate(model, [8, 9], 40, tree=chain_tree(4))
    assert again.stats.capture_time_s == 0  # plain decoding's and the chain's graphs, replayed
    assert sorted(decoder_forward(model, 100)._graphs) == [5]


def test_fast_is_refused_where_it_cannot_run():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4))
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA model"):
        StaticForward(model, 64, cuda_graphs=True)
    forward = StaticForward(model, 16)
    with pytest.raises(ConfigError, match="do not fit the static cache of 16"):
        forward.prefill(torch.arange(17)[None])
    lean = isinstance(decoder_forward(model, 100), LeanForward)  # the CPU default: lean where it runs
    assert lean == (_cpu.extension() is not None)
    bf16 = MedusaLoraModel.from_base(tiny_llama().to(torch.bfloat16), MedusaConfig(num_heads=4))
    assert isinstance(decoder_forward(bf16, 100), EagerForward)  # else eager
    assert "runs fp32" in why_not_lean(bf16)


def test_tree_tuning_measures_the_forward_generate_runs():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4))
    trees = [ROOT_ONLY, chain_tree(2), TokenTree([(0,), (1,), (0, 0)])]
    for fast in (False, True):
        costs = measure_step_costs(model, trees, prefix_len=32, repeats=1, fast=fast)
        assert set(costs) == set(trees) and all(c.verify > 0 for c in costs.values())


def test_the_default_follows_the_environment_and_the_cli_flag(monkeypatch):
    import argparse

    from medusa_lora.cli.options import add_fast_path_option, apply_fast_path_option
    from medusa_lora.verification.forward import ENV_VAR

    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4))
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setenv(_cpu.ENV_VAR, "0")  # no CPU kernels: no lean forward
    assert isinstance(decoder_forward(model, 100), StaticForward)  # static on a CPU then, when asked
    monkeypatch.setenv(ENV_VAR, "yes")
    with pytest.raises(ConfigError, match="MEDUSA_LORA_FAST_PATH='yes' is invalid"):
        decoder_forward(model, 100)
    monkeypatch.setenv(ENV_VAR, "1")
    parser = argparse.ArgumentParser()
    add_fast_path_option(parser)
    apply_fast_path_option(parser.parse_args(["--no-fast-path"]))
    assert isinstance(decoder_forward(model, 100), EagerForward)


def test_static_forwards_go_with_their_model():
    import gc
    import weakref

    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4))
    generate(model, [1, 2, 3], 5, speculative=False, fast=True)
    forward = weakref.ref(decoder_forward(model, 100, fast=True))
    del model
    gc.collect()
    assert forward() is None  # no reference cycle through the cache keeps the model (and its graphs) alive
