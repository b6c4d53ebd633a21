"""Shared fixtures: tiny random Llama-family models built from configs, and the prepared demo model."""

from __future__ import annotations

import os
import string

import torch

# Triton decides "compiled or interpreted" at import time, and transformers imports it: without a GPU,
# switch the interpreter on before anything else so the kernel tests run against their references.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from medusa_lora.model.demo import demo_model_dir

TINY_VOCAB = 97
CHAR_VOCAB = ["<unk>", "<eos>", "\n", *string.printable[:95]]  # one token per character


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a tiny chat template, so chat formatting runs without downloads."""
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(CHAR_VOCAB)}, [], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def randomize_heads(model, seed: int):
    """``model`` with N(0, 0.3) random head weights (from ``seed``): heads that draft varied, mostly wrong
    tokens, unlike the identity-initialised ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.3, generator=generator)
    return model


def tiny_causal_lm(config_class, model_class, seed: int = 0, **overrides):
    """A random fp32 causal LM small enough for many generate() calls per test."""
    torch.manual_seed(seed)
    values = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    return model_class(config_class(**{**values, **overrides})).eval()


def tiny_llama(
    seed: int = 0,
    vocab_size: int = TINY_VOCAB,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
) -> LlamaForCausalLM:
    return tiny_causal_lm(
        LlamaConfig,
        LlamaForCausalLM,
        seed,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
    )


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    return tiny_causal_lm(Qwen2Config, Qwen2ForCausalLM, seed)


def tiny_mistral(seed: int = 0, sliding_window: int = 256) -> MistralForCausalLM:
    return tiny_causal_lm(MistralConfig, MistralForCausalLM, seed, sliding_window=sliding_window)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def demo_dir():
    """The prepared SmolLM2-135M dir; `medusa-lora prepare-model` makes it (CI runs that first)."""
    path = demo_model_dir()
    if not (path / "model.safetensors").is_file():
        pytest.skip("the demo model is not prepared: run `medusa-lora prepare-model`")
    return path


@pytest.fixture(scope="module", params=["eager", "fast", "static"])
def both_forwards(request):
    """A module's tests on each decoder forward: eager (``MEDUSA_LORA_FAST_PATH=0``), the device's fast one (``1``:
    the lean forward on a CPU with the CPU kernels) and the static one (``1`` with the CPU kernels off: the CUDA
    default, so the CPU suite runs it too). Module-scoped: hypothesis allows no function-scoped fixture."""
    from medusa_lora.kernels._cpu import ENV_VAR as KERNELS
    from medusa_lora.verification.forward import ENV_VAR

    settings = {
        "eager": {ENV_VAR: "0", KERNELS: None},
        "fast": {ENV_VAR: "1", KERNELS: None},
        "static": {ENV_VAR: "1", KERNELS: "0"},
    }[request.param]
    before = {name: os.environ.get(name) for name in settings}
    for name, value in settings.items():
        _set_env(name, value)
    yield request.param
    for name, value in before.items():
        _set_env(name, value)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each test its own accelerate state: a trainer's mixed precision must not leak into the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
