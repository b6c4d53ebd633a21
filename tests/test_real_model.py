"""The real SmolLM2-135M-Instruct (prepared offline): greedy speculative output == transformers generate."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from medusa_lora.decoding import generate
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import default_tree

from drafters import NoisyOracleDrafter

pytestmark = pytest.mark.real_model

PROMPTS = [
    "List three facts about the moon.",
    "Write a JSON object with fields name and age for a person called Ada who is 36.",
]


@pytest.fixture(scope="module")
def real(demo_dir):
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )  # peft init: B = 0, an empty LoRA
    return MedusaLoraModel.from_base(str(demo_dir), MedusaConfig(num_heads=4), lora)


def test_demo_model_is_the_expected_smollm2(real):
    config = real.model_config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (576, 30, 9)
    assert (config.num_key_value_heads, config.vocab_size) == (3, 49152)
    assert real.tokenizer.eos_token == "<|im_end|>"
    assert real.tokenizer.chat_template


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_speculative_output_equals_transformers_generate(real, text):
    tokenizer = real.tokenizer
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    expected = real.causal_lm.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False
    )[0, ids.shape[1] :].tolist()
    assert len(expected) > 5
    fresh = generate(real, ids[0], max_new_tokens=40)
    assert fresh.tokens == expected
    drafted = generate(
        real,
        ids[0],
        max_new_tokens=40,
        tree=default_tree(16),
        drafter=NoisyOracleDrafter(expected + [0] * 8, 49152, hit=0.8),
    )
    assert drafted.tokens == expected
    assert drafted.stats.mean_accepted_length > 1.5
    assert fresh.text == tokenizer.decode(expected, skip_special_tokens=True)
