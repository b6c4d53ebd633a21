"""Exports for vLLM, TGI and LoRAX draft what the library drafts, and import brings them back bit for bit.

The reference loaders below are written from the engines' loader code, not from medusa_lora's classes:
- vLLM: vllm/model_executor/models/medusa.py (ResidualBlock: x + SiLU(layer(x)) per layer, bias only
  with medusa_fc_bias; original_lm_head: one lm_heads.0.weight for all heads; load_weights: a token_map
  is kept only when truncated_vocab_size < vocab_size, and LM-head rows beyond it are indexed by it;
  compute_logits scatters the draft logits into a -inf full-vocabulary row), and
  vllm/transformers_utils/configs/medusa.py (keys with "num"+"heads" / "num"+"layers" are renamed).
- TGI: server/text_generation_server/layers/speculative.py (a config with "architectures" is not Medusa)
  and layers/medusa.py (MedusaHeadV1: per head, ResBlocks {i}.{j}.linear then {i}.{n}.weight; tried first,
  MedusaHeadV2 when that fails: one fused linear over {i}.0.linear, 1 layer only, the base LM head).
- LoRAX: server/lorax_server/adapters/medusa.py (MedusaConfig.load reads base_model_name_or_path,
  medusa_num_heads, medusa_num_layers, version; MedusaModel: v1 when num_layers > 1 or 0.{n}.weight
  exists, else v2) and adapters/__init__.py (adapter_config.json beside it: a LoRA + Medusa adapter).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from medusa_lora.cli import main
from medusa_lora.errors import CheckpointError, ConfigError
from medusa_lora.formats.export import export_heads
from medusa_lora.formats.import_heads import import_heads
from medusa_lora.model.base import load_base_model
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel

from conftest import TINY_VOCAB, randomize_heads, tiny_llama

TOP_K = 5
DRAFT = 40


def random_model(separate: bool = False, num_layers: int = 1, draft: bool = False, lora: bool = False):
    base = tiny_llama()
    config = MedusaConfig(num_heads=3, num_layers=num_layers, separate_lm_head=separate)
    lora_config = (
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None
    )
    model = MedusaLoraModel.from_base(base, config, lora_config)
    randomize_heads(model, seed=1)
    if draft:
        model.set_draft_vocab(torch.randperm(TINY_VOCAB, generator=torch.Generator().manual_seed(2))[:DRAFT])
    return model


def hidden_states(model: MedusaLoraModel) -> torch.Tensor:
    ids = torch.randint(0, TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.hidden_states(ids)


def library_drafts(model: MedusaLoraModel, hidden: torch.Tensor) -> torch.Tensor:
    """(K, ..., TOP_K) token ids, best first, as medusa-lora's own drafting ranks them."""
    with torch.no_grad():
        return model.heads.token_ids(model.heads(hidden, model.lm_head).topk(TOP_K).indices)


# ----------------------------------------------------------------- reference loaders (from the engines)
def vllm_reference_drafts(directory, hidden: torch.Tensor) -> torch.Tensor:
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "medusa"
    assert config.get("architectures", ["MedusaModel"]) == ["MedusaModel"]  # vLLM's default
    for key in list(config):
        if "num" in key and "heads" in key:
            config["num_heads"] = config.pop(key)
        elif "num" in key and "layers" in key:
            config["num_hidden_layers"] = config.pop(key)
    weights = {
        k.replace("medusa_heads.", ""): v for k, v in load_file(directory / "model.safetensors").items()
    }
    vocab = config["vocab_size"]
    truncated = config.get("truncated_vocab_size") or vocab
    token_map = weights["token_map"] if truncated < vocab else None
    drafts = []
    for k in range(config["num_heads"]):
        x = hidden
        for j in range(config["num_hidden_layers"]):
            bias = weights[f"blocks.{k}.layers.{j}.bias"] if config.get("medusa_fc_bias", False) else None
            x = x + F.silu(F.linear(x, weights[f"blocks.{k}.layers.{j}.weight"], bias))
        lm = (
            weights["lm_heads.0.weight"]
            if config.get("original_lm_head", False)
            else weights[f"lm_heads.{k}.weight"]
        )
        if token_map is not None and lm.shape[0] > token_map.shape[0]:
            lm = lm[token_map]
        assert lm.shape[0] == truncated
        logits = F.linear(x, lm)
        if token_map is not None:
            full = torch.full((*logits.shape[:-1], vocab), -torch.inf)
            full[..., token_map] = logits
            logits = full
        drafts.append(logits.topk(TOP_K).indices)
    return torch.stack(drafts)


def tgi_reference_drafts(
    directory, hidden: torch.Tensor, base_lm_head: torch.Tensor, engine: str
) -> torch.Tensor:
    config = json.loads((directory / "config.json").read_text())
    assert "architectures" not in config  # TGI's SpeculativeHead would not load it as Medusa
    heads, n = config["medusa_num_heads"], config["medusa_num_layers"]
    weights = load_file(directory / "medusa_lm_head.safetensors")
    if engine == "lorax":
        assert {"base_model_name_or_path", "medusa_num_heads", "medusa_num_layers"} <= set(config)
        v1 = n > 1 or f"0.{n}.weight" in weights
    else:
        v1 = all(f"{i}.{n}.weight" in weights for i in range(heads))  # MedusaHeadV1 loads, else V2
    assert float(config.get("version", 1)) == (1 if v1 else 2)
    if v1:
        drafts = []
        for i in range(heads):
            x = hidden
            for j in range(n):
                x = x + F.silu(
                    F.linear(x, weights[f"{i}.{j}.linear.weight"], weights[f"{i}.{j}.linear.bias"])
                )
            drafts.append(F.linear(x, weights[f"{i}.{n}.weight"]).topk(TOP_K).indices)
        return torch.stack(drafts)
    assert n == 1
    fused_w = torch.cat([weights[f"{i}.0.linear.weight"] for i in range(heads)])
    fused_b = torch.cat([weights[f"{i}.0.linear.bias"] for i in range(heads)])
    residual = F.silu(F.linear(hidden, fused_w, fused_b)).reshape(*hidden.shape[:-1], heads, hidden.shape[-1])
    logits = F.linear(hidden.unsqueeze(-2) + residual, base_lm_head)  # (..., heads, vocab)
    return logits.topk(TOP_K).indices.movedim(-2, 0)


def reference_drafts(fmt: str, directory, model: MedusaLoraModel, hidden: torch.Tensor) -> torch.Tensor:
    if fmt == "vllm":
        return vllm_reference_drafts(directory, hidden)
    return tgi_reference_drafts(directory, hidden, model.lm_head.weight.detach(), fmt)


# ----------------------------------------------------------------- parity and round trip
HEAD_SHAPES = [(False, 1), (True, 1), (False, 2), (True, 2)]
CASES = [
    (fmt, separate, layers, False) for fmt in ("vllm", "tgi", "lorax") for separate, layers in HEAD_SHAPES
]
CASES += [("vllm", False, layers, True) for layers in (1, 2)]  # vLLM loads a token_map on a shared LM head


@pytest.mark.parametrize(("fmt", "separate", "num_layers", "draft"), CASES)
def test_exports_draft_what_the_library_drafts_and_import_round_trips(
    tmp_path, fmt, separate, num_layers, draft
):
    model = random_model(separate, num_layers, draft)
    hidden = hidden_states(model)
    export_heads(model, tmp_path / "export", fmt)
    assert torch.equal(
        reference_drafts(fmt, tmp_path / "export", model, hidden), library_drafts(model, hidden)
    )

    import_heads(tmp_path / "export", tmp_path / "imported", model.causal_lm)
    imported = MedusaLoraModel.from_pretrained(model.causal_lm, tmp_path / "imported")
    original, back = model.heads.state_dict(), imported.heads.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert (imported.config.separate_lm_head, imported.config.draft_vocab_size) == (
        separate,
        DRAFT if draft else 0,
    )


@pytest.mark.parametrize("fmt", ["tgi", "lorax"])
def test_draft_vocabulary_heads_are_refused_where_there_is_no_token_map(tmp_path, fmt):
    merged = {"merged_base_dir": tmp_path / "merged"} if fmt == "tgi" else {}
    with pytest.raises(ConfigError, match="no token map"):
        export_heads(random_model(draft=True, lora=fmt == "tgi"), tmp_path / "export", fmt, **merged)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the merged base


def test_separate_lm_heads_with_a_draft_vocabulary_are_refused_for_vllm(tmp_path):
    """vLLM 0.32 sizes per-head LM heads to the full vocabulary, then loads only the token_map rows: it fails."""
    with pytest.raises(ConfigError, match="LM heads of their own and a draft vocabulary"):
        export_heads(random_model(separate=True, draft=True), tmp_path / "export", "vllm")
    assert not (tmp_path / "export").exists()


def test_published_vllm_heads_with_truncated_rows_and_no_bias_import(tmp_path):
    """A vLLM checkpoint as others publish it: draft-only LM-head rows, no block bias, prefixed keys."""
    base = tiny_llama()
    torch.manual_seed(4)
    token_map = torch.randperm(TINY_VOCAB)[:DRAFT]
    weights = {"medusa_heads.token_map": token_map}
    for k in range(2):
        weights[f"medusa_heads.blocks.{k}.layers.0.weight"] = torch.randn(64, 64) * 0.3
        weights[f"medusa_heads.lm_heads.{k}.weight"] = torch.randn(DRAFT, 64)
    (tmp_path / "published").mkdir()
    save_file(weights, tmp_path / "published" / "model.safetensors")
    config = {
        "model_type": "medusa",
        "hidden_size": 64,
        "vocab_size": TINY_VOCAB,
        "medusa_num_heads": 2,
        "num_hidden_layers": 1,
        "truncated_vocab_size": DRAFT,
    }
    (tmp_path / "published" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="--model"):
        import_heads(tmp_path / "published", tmp_path / "imported")
    import_heads(tmp_path / "published", tmp_path / "imported", base)
    model = MedusaLoraModel.from_pretrained(base, tmp_path / "imported")
    hidden = hidden_states(model)
    assert torch.equal(vllm_reference_drafts(tmp_path / "published", hidden), library_drafts(model, hidden))


# ----------------------------------------------------------------- LoRA models, merged base, safety
def state_copy(model: MedusaLoraModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["vllm", "tgi"])
def test_lora_models_export_with_a_merged_base_and_the_callers_model_is_untouched(tmp_path, fmt):
    model = random_model(lora=True)
    ids = torch.randint(0, TINY_VOCAB, (1, 9))
    with torch.no_grad():
        tuned_logits = model(ids).logits
    before = state_copy(model)
    with pytest.raises(CheckpointError, match="merged_base_dir"):
        export_heads(model, tmp_path / "export", fmt)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="overwrite"):  # refused before anything is written
        export_heads(model, tmp_path / "export", fmt, merged_base_dir=tmp_path / "merged")
    assert not (tmp_path / "export").exists()
    export_heads(model, tmp_path / "export", fmt, merged_base_dir=tmp_path / "merged", overwrite=True)

    after = state_copy(model)
    assert model.has_lora and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "merged" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned_logits, rtol=1e-4, atol=1e-5)
    if fmt == "tgi":
        config = json.loads((tmp_path / "export" / "config.json").read_text())
        assert config["base_model_name_or_path"] == str((tmp_path / "merged").resolve())
    # served on the merged base, the exported heads draft what the LoRA model drafts
    tuned_hidden = hidden_states(model)
    assert torch.equal(
        reference_drafts(fmt, tmp_path / "export", model, tuned_hidden), library_drafts(model, tuned_hidden)
    )
    with pytest.raises(CheckpointError, match="overwrite"):
        export_heads(model, tmp_path / "export", fmt, merged_base_dir=tmp_path / "merged2")


def test_lorax_export_is_one_adapter_dir_with_the_lora_and_the_heads(tmp_path):
    model = random_model(lora=True)
    with pytest.raises(ConfigError, match="LoRAX applies the LoRA"):
        export_heads(model, tmp_path / "export", "lorax", merged_base_dir=tmp_path / "merged")
    export_heads(model, tmp_path / "export", "lorax")
    names = {p.name for p in (tmp_path / "export").iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "medusa_lm_head.safetensors",
    } <= names
    lora_keys = load_file(tmp_path / "export" / "adapter_model.safetensors").keys()
    assert lora_keys and all("lora_" in k for k in lora_keys)
    hidden = hidden_states(model)  # LoRAX runs the LoRA, then the heads on the base LM head
    assert torch.equal(
        reference_drafts("lorax", tmp_path / "export", model, hidden), library_drafts(model, hidden)
    )


def test_unknown_format_lm_head_bias_and_conditioned_heads_are_refused(tmp_path):
    model = random_model()
    with pytest.raises(ConfigError, match="unknown export format"):
        export_heads(model, tmp_path / "export", "medusa")
    biased = copy.deepcopy(model)
    biased.causal_lm.lm_head.bias = torch.nn.Parameter(torch.zeros(TINY_VOCAB))
    with pytest.raises(ConfigError, match="bias"):
        export_heads(biased, tmp_path / "export", "vllm")
    for conditioning in ({"root_conditioned": True}, {"path_conditioned": True}):
        conditioned = MedusaLoraModel.from_base(copy.deepcopy(model.causal_lm), MedusaConfig(**conditioning))
        for fmt in ("vllm", "tgi", "lorax"):
            with pytest.raises(ConfigError, match="root- or path-conditioned.*vllm_plugin"):
                export_heads(conditioned, tmp_path / "export", fmt)
    assert not (tmp_path / "export").exists()


@pytest.mark.real_model
def test_cli_export_and_import(tmp_path, demo_dir, capsys):
    """The two subcommands end to end, on a tiny base saved beside the demo tokenizer."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / name, base_dir / name)
    model = random_model()
    model.config.base_model = str(base_dir)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--format", "tgi", "--out", str(tmp_path / "tgi")]) == 0
    assert main(["import", str(tmp_path / "tgi"), "--out", str(tmp_path / "imported")]) == 0
    imported = MedusaLoraModel.from_pretrained(None, tmp_path / "imported")
    original, back = model.heads.state_dict(), imported.heads.state_dict()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert "enable_weights_track" not in capsys.readouterr().err  # no draft vocabulary: no loader note
    drafting = random_model(draft=True)
    drafting.config.base_model = str(base_dir)
    drafting.save_pretrained(tmp_path / "drafting")
    assert (
        main(["export", str(tmp_path / "drafting"), "--format", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    )
    assert '"enable_weights_track": False' in capsys.readouterr().err  # what vLLM 0.32 needs for token_map


def test_base_models_load_from_safetensors_only(tmp_path):
    """A model dir holding only a pickled checkpoint is refused, never unpickled."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    assert load_base_model(str(tmp_path / "base")).config.vocab_size == TINY_VOCAB
    (tmp_path / "base" / "model.safetensors").unlink()
    torch.save(base.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_base_model(str(tmp_path / "base"))
