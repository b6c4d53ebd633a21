"""Exported heads load into the original Medusa module layout and give the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from medusa_lora.config import MedusaConfig
from medusa_lora.errors import CheckpointError
from medusa_lora.export import MEDUSA_HEADS_FILE, export_medusa
from medusa_lora.model import MedusaLoraModel

from conftest import TINY_VOCAB, tiny_llama


class MedusaResBlock(nn.Module):
    """The original Medusa ResBlock: ``x + SiLU(linear(x))`` (attribute names matter for the keys)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def medusa_heads(num_heads: int, num_layers: int, hidden: int, vocab: int) -> nn.ModuleList:
    """The original Medusa head stack: per head, ResBlocks then a bias-free LM head."""
    return nn.ModuleList(
        nn.Sequential(
            *[MedusaResBlock(hidden) for _ in range(num_layers)], nn.Linear(hidden, vocab, bias=False)
        )
        for _ in range(num_heads)
    )


@pytest.mark.parametrize("num_layers", [1, 2])
def test_exported_heads_match_in_the_medusa_layout(tmp_path, num_layers):
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=3, num_layers=num_layers))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.1)
    export_medusa(model, tmp_path / "medusa")
    config = json.loads((tmp_path / "medusa" / "config.json").read_text())
    assert (config["medusa_num_heads"], config["medusa_num_layers"]) == (3, num_layers)
    original = medusa_heads(3, num_layers, 64, TINY_VOCAB)
    original.load_state_dict(load_file(tmp_path / "medusa" / MEDUSA_HEADS_FILE), strict=True)
    hidden = torch.randn(5, 64)
    expected = model.heads(hidden, model.lm_head)
    torch.testing.assert_close(torch.stack([head(hidden) for head in original]), expected)


def test_lora_models_export_with_their_merged_base(tmp_path):
    base = tiny_llama()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=2), lora)
    ids = torch.randint(0, TINY_VOCAB, (1, 9))
    with torch.no_grad():
        tuned_logits = model(ids).logits
    with pytest.raises(CheckpointError, match="merged_base_dir"):
        export_medusa(model, tmp_path / "medusa")
    export_medusa(model, tmp_path / "medusa", merged_base_dir=tmp_path / "merged")
    config = json.loads((tmp_path / "medusa" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned_logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="overwrite"):
        export_medusa(model, tmp_path / "medusa")
