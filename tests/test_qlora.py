"""QLoRA: training on a 4-bit (bitsandbytes) base, and the merged model that keeps its greedy output."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from test_training import make_tiny_model, task_rows, tiny_config, write_jsonl
from transformers import AutoModelForCausalLM

from medusa_lora.decoding import generate
from medusa_lora.errors import CheckpointError, ConfigError, IncompatibleBaseModelError
from medusa_lora.formats.export import export_heads
from medusa_lora.model import qlora
from medusa_lora.model.base import load_base_model
from medusa_lora.model.config import CONFIG_NAME
from medusa_lora.model.inference import for_inference
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training import TrainConfig, train
from medusa_lora.training.build import build_model
from medusa_lora.training.data import IGNORE_INDEX
from medusa_lora.training.losses import predict, shift_left
from medusa_lora.training.sharding import wants_fsdp

from test_generation import hf_greedy

needs_bnb = pytest.mark.skipif(not qlora.bitsandbytes_available(), reason="bitsandbytes is not installed")
WORDS = ["abc", "fedcba", "cafe"]


def chat_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    return encoded["input_ids"][0].tolist()


def has_4bit_layers(model: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.fixture(scope="module")
def tiny_qlora(tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny base's dir, the model dir of 8 joint steps on its 4-bit NF4 base with double quantization)."""
    if not qlora.bitsandbytes_available():
        pytest.skip("bitsandbytes is not installed")
    root = tmp_path_factory.mktemp("qlora")
    tiny = make_tiny_model(root / "tiny")
    write_jsonl(tiny / "train.jsonl", task_rows(32, 0))
    write_jsonl(tiny / "validation.jsonl", task_rows(8, 1))
    config = tiny_config(
        tiny,
        root / "out",
        max_steps=8,
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        mixed_precision="no",
    )
    return tiny, train(config)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"load_in_4bit": True, "mode": "heads"}, "load_in_4bit trains a LoRA on a 4-bit base .* mode heads"),
        ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type applies to a 4-bit base only"),
        ({"bnb_4bit_use_double_quant": True}, "bnb_4bit_use_double_quant applies to a 4-bit base only"),
        (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
            r"bnb_4bit_quant_type must be one of \['nf4'",
        ),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "fp32"}, "bnb_4bit_compute_dtype must be one of"),
    ],
)
def test_config_refuses_4bit_settings_that_cannot_apply(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(train_file="x.jsonl", **settings)


def test_config_names_the_fix_when_bitsandbytes_is_missing(monkeypatch):
    monkeypatch.setattr(qlora, "bitsandbytes_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"load_in_4bit needs bitsandbytes.*pip install 'medusa-lora\[qlora\]'"
    ):
        TrainConfig(train_file="x.jsonl", load_in_4bit=True)
    TrainConfig(train_file="x.jsonl")  # without 4-bit nothing needs it


# ---------------------------------------------------------------- training and the round trip
@needs_bnb
def test_heads_train_on_the_quantized_models_hidden_states(tiny_qlora, tmp_path):
    """What the heads read in a training forward is the 4-bit base's last hidden state (the LoRA starts at 0),
    exactly that of the base dequantized, and not the original base's."""
    tiny, _ = tiny_qlora
    model = build_model(tiny_config(tiny, tmp_path, load_in_4bit=True))
    assert has_4bit_layers(model.base)
    ids = torch.tensor([chat_ids(model.tokenizer, "reverse abcd") + [10, 11, 12]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -3:] = ids[0, -3:]
    heads = model.heads.num_heads
    rows = (
        torch.stack([shift_left(labels, k + 2, IGNORE_INDEX) for k in range(heads)]).ne(IGNORE_INDEX).any(0)
    )
    dequantized = qlora.merge_into_base(
        qlora.load_4bit_base(str(tiny), qlora.four_bit_record(), torch.float32)
    )
    original = load_base_model(str(tiny))
    with torch.no_grad():
        parts = predict(model, ids, torch.ones_like(ids), labels, True, True, with_inputs=True)
        expected = dequantized.get_decoder()(input_ids=ids).last_hidden_state[rows]
        unquantized = original.get_decoder()(input_ids=ids).last_hidden_state[rows]
    torch.testing.assert_close(parts.head_inputs.hidden, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unquantized, expected, atol=1e-2)


@needs_bnb
def test_qlora_train_merge_generate_round_trips_the_greedy_output(tiny_qlora):
    """The merged model (the 4-bit base dequantized as training computed with it, the LoRA merged in) generates
    what the QLoRA model (4-bit base, LoRA unmerged) generates under transformers' generate, token for token; so
    does the QLoRA model served unmerged."""
    _, model_dir = tiny_qlora
    record = json.loads((model_dir / CONFIG_NAME).read_text())["base_quantization"]
    assert record["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and record["dtype"] == "float32"
    assert record["quantization_config"]["bnb_4bit_use_double_quant"] is True
    quantized = MedusaLoraModel.from_pretrained(None, model_dir)  # quantized again, as in training
    assert quantized.has_lora and has_4bit_layers(quantized.base)
    merged = for_inference(MedusaLoraModel.from_pretrained(None, model_dir))
    assert not merged.has_lora and not has_4bit_layers(merged.base) and not qlora.is_4bit(merged.causal_lm)
    unmerged = for_inference(MedusaLoraModel.from_pretrained(None, model_dir), merge=False)
    assert unmerged.has_lora and has_4bit_layers(unmerged.base)
    for i, word in enumerate(WORDS):
        prompt = chat_ids(quantized.tokenizer, f"reverse {word}")
        expected = hf_greedy(quantized.base, prompt, 12)  # transformers' generate on the QLoRA model
        assert hf_greedy(merged.base, prompt, 12) == expected
        models = (merged, unmerged) if i == 0 else (merged,)  # 4-bit forwards are slow on a CPU: one prompt
        for model in models:
            for speculative in (True, False):
                out = generate(model, prompt, max_new_tokens=12, eos_token_id=[], speculative=speculative)
                assert out.tokens == expected


@needs_bnb
def test_merging_into_the_original_or_a_requantized_base_is_another_model(tiny_qlora):
    """The pitfall is real: the LoRA merged into the original weights, or by peft into the 4-bit layers (which
    re-quantizes the sum), changes the logits by orders of magnitude more than the dequantized merge does."""
    tiny, model_dir = tiny_qlora
    quantized = MedusaLoraModel.from_pretrained(None, model_dir)
    ids = torch.tensor([chat_ids(quantized.tokenizer, "reverse abcdef")])
    with torch.inference_mode():
        reference = quantized.base(ids).logits
        ours = qlora.merge_into_base(copy.deepcopy(quantized.base))(ids).logits
        requantized = copy.deepcopy(quantized.base).merge_and_unload()(ids).logits
        naive = (
            PeftModel.from_pretrained(load_base_model(str(tiny)), model_dir).merge_and_unload()(ids).logits
        )
    error = (ours - reference).abs().max().item()
    assert error < 1e-4
    for other in (naive, requantized):
        assert (other - reference).abs().max().item() > 1000 * error


@needs_bnb
def test_the_loaded_4bit_model_computes_in_eval_mode_as_in_training(tiny_qlora):
    """bitsandbytes' CPU inference kernel (AVX-512 BF16) multiplies in bf16; the loaded model keeps training's
    dequantize-then-multiply in fp32, bit for bit."""
    import bitsandbytes as bnb

    _, model_dir = tiny_qlora
    model = MedusaLoraModel.from_pretrained(None, model_dir)
    ids = torch.tensor([chat_ids(model.tokenizer, "reverse cab")])
    with torch.inference_mode():
        evaluated = model.base(ids).logits
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()  # as in training (LoRA dropout stays off)
    with torch.no_grad():
        trained = model.base(ids).logits
    assert torch.equal(evaluated, trained)


@needs_bnb
def test_a_bf16_load_quantizes_the_weights_training_quantized(tiny_qlora):
    """Loaded in bf16, the base is still quantized from the fp32 weights training quantized (the heads'
    fingerprint matches); embeddings, norms and the merged weights are bf16."""
    _, model_dir = tiny_qlora
    fp32 = MedusaLoraModel.from_pretrained(None, model_dir)
    bf16 = MedusaLoraModel.from_pretrained(None, model_dir, dtype=torch.bfloat16)  # the fingerprint matches
    layer32 = fp32.causal_lm.model.layers[1].mlp.down_proj.base_layer.weight
    layer16 = bf16.causal_lm.model.layers[1].mlp.down_proj.base_layer.weight
    assert torch.equal(layer32, layer16)
    assert torch.equal(layer32.quant_state.absmax, layer16.quant_state.absmax)
    assert bf16.causal_lm.get_input_embeddings().weight.dtype == torch.bfloat16 == bf16.dtype
    merged = for_inference(bf16)
    assert merged.dtype == torch.bfloat16 and not has_4bit_layers(merged.base)


@needs_bnb
def test_a_qlora_model_is_refused_where_it_would_run_on_another_base(tiny_qlora, monkeypatch):
    tiny, model_dir = tiny_qlora
    with pytest.raises(IncompatibleBaseModelError, match="trained on a 4-bit base .*nf4, double quant"):
        MedusaLoraModel.from_pretrained(load_base_model(str(tiny)), model_dir)
    quantized = MedusaLoraModel.from_pretrained(None, model_dir)
    with pytest.raises(ValueError, match="already 4-bit"):
        for_inference(quantized, weights="int4")
    with pytest.raises(ConfigError, match="LoRAX would apply its LoRA to its own base"):
        export_heads(quantized, model_dir.parent / "lorax", "lorax")
    with pytest.raises(CheckpointError, match="QLoRA-tuned model.*merged_base_dir"):
        export_heads(quantized, model_dir.parent / "vllm", "vllm")
    monkeypatch.setattr(qlora, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*pip install 'medusa-lora\[qlora\]'"):
        MedusaLoraModel.from_pretrained(None, model_dir)


@needs_bnb
def test_export_writes_the_base_dequantized_with_the_lora_merged(tiny_qlora, tmp_path):
    _, model_dir = tiny_qlora
    quantized = MedusaLoraModel.from_pretrained(None, model_dir)
    export_heads(quantized, tmp_path / "heads", "vllm", merged_base_dir=tmp_path / "base")
    assert quantized.has_lora and has_4bit_layers(quantized.base)  # the caller's model is untouched
    assert "quantization_config" not in json.loads((tmp_path / "base" / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "base", use_safetensors=True)
    prompt = chat_ids(quantized.tokenizer, "reverse bead")
    assert hf_greedy(exported, prompt, 16) == hf_greedy(quantized.base, prompt, 16)


# ---------------------------------------------------------------- the demo model
@needs_bnb
@pytest.mark.real_model
def test_demo_model_qlora_round_trip(demo_dir, tmp_path):
    """Two QLoRA steps on SmolLM2-135M's NF4 base: the merged model's greedy output is the QLoRA model's."""
    rows = [
        {"prompt": f"Spell {w} backwards.", "completion": w[::-1]}
        for w in ("moon", "river", "stone", "cloud")
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = TrainConfig(
        model=str(demo_dir),
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "train.jsonl"),
        output_dir=str(tmp_path / "out"),
        load_in_4bit=True,
        max_steps=2,
        batch_size=2,
        max_length=48,
        lora_r=4,
        lora_last_layers=2,
        lr_lora=1e-3,
        num_heads=2,
        calibration_samples=2,
        tree_size=4,
        mixed_precision="no",
    )
    model = MedusaLoraModel.from_pretrained(None, train(config))
    prompt = chat_ids(model.tokenizer, "Spell water backwards.")
    expected = hf_greedy(model.base, prompt, 12)  # the QLoRA model, under transformers' generate
    merged = for_inference(model)
    assert not has_4bit_layers(merged.base)
    assert generate(merged, prompt, max_new_tokens=12, eos_token_id=[]).tokens == expected


@needs_bnb
def test_fsdp_refuses_a_4bit_base(tmp_path):
    cfg = TrainConfig(model="m", train_file="t.jsonl", load_in_4bit=True, fsdp=True)
    with pytest.raises(ConfigError, match="load_in_4bit"):
        wants_fsdp(cfg, SimpleNamespace(num_processes=2))
