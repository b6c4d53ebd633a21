"""Generation through the Triton kernels (compiled on CUDA, else interpreted on CPU) equals the torch reference
path."""

from __future__ import annotations

import random

import pytest
import torch

from medusa_lora.decoding import generate
from medusa_lora.kernels import kernel_backend
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import default_tree

from conftest import TINY_VOCAB, tiny_llama
from drafters import NoisyOracleDrafter
from test_generation import hf_greedy, random_prompt


def test_greedy_generation_with_triton_equals_the_reference(monkeypatch):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs CPU tensors only interpreted
    base = tiny_llama(seed=7, heads=6, kv_heads=2, hidden_size=96).to(device)  # head dim 16, GQA 3
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    rng = random.Random(7)
    for i in range(2):
        prompt = random_prompt(rng, low=5, high=30)
        monkeypatch.setenv("MEDUSA_LORA_KERNELS", "reference")
        expected = hf_greedy(base, prompt, 16)
        drafter = NoisyOracleDrafter(expected + [0] * 8, TINY_VOCAB, hit=0.7, seed=i)
        reference = generate(model, prompt, max_new_tokens=16, tree=default_tree(12, 3), drafter=drafter)
        monkeypatch.setenv("MEDUSA_LORA_KERNELS", "triton")
        assert kernel_backend(model.device) == "triton"
        drafter = NoisyOracleDrafter(expected + [0] * 8, TINY_VOCAB, hit=0.7, seed=i)
        triton = generate(model, prompt, max_new_tokens=16, tree=default_tree(12, 3), drafter=drafter)
        assert model.causal_lm.config._attn_implementation == "medusa_tree"
        assert reference.tokens == triton.tokens == expected
        assert triton.stats.accepted_lengths == reference.stats.accepted_lengths
        assert max(triton.stats.accepted_lengths) > 1  # tree steps (and non-trivial compactions) happened
