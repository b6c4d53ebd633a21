"""Loading base models by name, and the fingerprint that ties heads to the base weights they were trained on."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from medusa_lora.errors import CheckpointError
from medusa_lora.model.demo import DEMO_MODEL_NAME, prepare_demo_model

_SAMPLES_PER_TENSOR = 4096


def resolve_model_path(name_or_path: str) -> str:
    """``smollm2-135m`` -> the prepared demo dir; a local dir or a hub id is returned unchanged."""
    if name_or_path == DEMO_MODEL_NAME:
        return str(prepare_demo_model())
    return name_or_path


def load_base_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode; ``name_or_path`` is a hub id, a local dir or ``smollm2-135m``.
    ``quantization_config``: bitsandbytes quantizes the linear layers as they load (``qlora.load_4bit_base``)."""
    path = resolve_model_path(name_or_path)
    quantization = {} if quantization_config is None else {"quantization_config": quantization_config}
    try:  # safetensors only: a hub id or dir with only pickled (.bin) weights is refused, never unpickled
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **quantization)
    except OSError as exc:
        raise CheckpointError(
            f"cannot load base model {name_or_path!r} from safetensors weights: {exc}"
        ) from exc
    model.config.name_or_path = name_or_path
    return model.eval()


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword under which ``module``'s forward takes its KV cache: ``past_key_values`` in transformers up
    to 5.2x (which silently ignores an unknown ``cache=``), ``cache`` after the rename."""
    return _cache_argument(type(module).forward)


@functools.cache
def _cache_argument(forward: Callable) -> str:
    return "past_key_values" if "past_key_values" in _parameters(forward) else "cache"


def takes_cache_position(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward takes ``cache_position`` (transformers before 5.2x; without it given, such a
    forward derives it from the cache's length, a host sync)."""
    return "cache_position" in _parameters(type(module).forward)


@functools.cache
def _parameters(forward: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


@torch.no_grad()
def base_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the base weights: names, shapes and a strided sample of every tensor.

    Values are rounded to bf16 first, so the same checkpoint loaded in fp32 or bf16 gives the same
    fingerprint, while different weights (another model, a fine-tune) do not. LoRA layers are skipped. A 4-bit
    base's packed weights are sampled as they are: the same checkpoint quantized alike gives the same fingerprint.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if "lora_" in name or "medusa" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.bfloat16)
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
