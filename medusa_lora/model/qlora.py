"""QLoRA: the base model's linear layers in 4-bit (bitsandbytes NF4 / FP4) under a LoRA, and back to dense.

A LoRA trained on a 4-bit base learned to correct *that* base. Merged into the original 16/32-bit weights it
adapts another model (the classic QLoRA pitfall); peft's own merge into a 4-bit layer re-quantizes the sum,
which rounds most of the update away. ``merge_into_base`` instead dequantizes every 4-bit weight through
bitsandbytes, to exactly the values training computed with, and adds the LoRA to those: the merged dense
model computes what the QLoRA model computed, up to floating-point rounding.

A model trained this way records its quantization in ``medusa_config.json`` (``base_quantization``):
``{"quantization_config": <transformers' BitsAndBytesConfig>, "dtype": <the weights' dtype when quantized>}``.
Loading quantizes the base again with it; bitsandbytes' quantization is deterministic, so the 4-bit weights
are the ones training saw.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import BitsAndBytesConfig, PreTrainedModel

from medusa_lora.errors import ConfigError
from medusa_lora.model.base import load_base_model

INSTALL_HINT = "pip install 'medusa-lora[qlora]' (or: pip install bitsandbytes)"
# the BitsAndBytesConfig settings that decide a 4-bit base's weights and its matmuls
_BNB_KEYS = (
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
    "llm_int8_skip_modules",
)


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(what: str) -> None:
    """A ``ConfigError`` naming the fix unless bitsandbytes can be imported."""
    if not bitsandbytes_available():
        raise ConfigError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}")


def four_bit_record(
    quant_type: str = "nf4",
    double_quant: bool = False,
    compute_dtype: str = "float32",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A ``base_quantization`` record: 4-bit ``quant_type`` weights quantized from ``dtype`` ones."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return _record(config, dtype)


def quantization_record(model: PreTrainedModel) -> dict[str, Any] | None:
    """``model``'s ``base_quantization`` record if bitsandbytes holds its linear layers in 4-bit, else None."""
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, BitsAndBytesConfig) or not config.load_in_4bit:
        return None
    return _record(config, model.dtype)


def is_4bit(model: PreTrainedModel) -> bool:
    return quantization_record(model) is not None


def describe(record: dict[str, Any]) -> str:
    """``nf4, double quant, compute float32``: a record in a few words, for messages."""
    settings = record["quantization_config"]
    double = ", double quant" if settings["bnb_4bit_use_double_quant"] else ""
    return f"{settings['bnb_4bit_quant_type']}{double}, compute {settings['bnb_4bit_compute_dtype']}"


def load_4bit_base(name_or_path: str, record: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """The base quantized as ``record`` says (from weights in the record's dtype, as in training), computing as
    training did; its other parameters (embeddings, norms, LM head) then in ``dtype``."""
    require_bitsandbytes("a 4-bit (QLoRA) base")
    import bitsandbytes as bnb

    try:
        config = BitsAndBytesConfig(**record["quantization_config"])
        quantized_from = getattr(torch, record["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"base_quantization {record!r} is not a 4-bit bitsandbytes record: {exc}") from exc
    model = load_base_model(name_or_path, quantized_from, config)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On a CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit weight at its first forward in eval mode
            # and from then on multiplies in bf16 whatever the compute dtype. Training (train mode) multiplies
            # the dequantized weight in the compute dtype; so must generation, or it is not the trained model.
            module.support_avx512bf16_for_cpu = False
    if dtype != quantized_from:
        for param in model.parameters():
            if param.is_floating_point() and not isinstance(param, bnb.nn.Params4bit):
                param.data = param.data.to(dtype)
        model.config.dtype = dtype
    return model


def merge_into_base(base: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """``base`` with its LoRA (a ``PeftModel``'s active adapters) merged into its weights, in place.

    A 4-bit base is dequantized first (transformers' ``dequantize``: bitsandbytes' own dequantization, the
    weights the 4-bit layers computed with) and the LoRA's update added to those; otherwise peft's
    ``merge_and_unload``.
    """
    causal_lm = base.get_base_model() if isinstance(base, PeftModel) else base
    if not is_4bit(causal_lm):
        return base.merge_and_unload() if isinstance(base, PeftModel) else base
    with torch.no_grad():
        updates = [
            (layer, _lora_delta(layer, adapter))
            for layer in causal_lm.modules()
            if isinstance(layer, LoraLayer)
            for adapter in layer.active_adapters
            if adapter in layer.lora_A
        ]
        causal_lm.dequantize()  # every 4-bit layer (inside the LoRA layers too) becomes an nn.Linear
        for layer, delta in updates:
            weight = layer.get_base_layer().weight
            weight.data += delta.to(weight.dtype)
    return base.unload() if isinstance(base, PeftModel) else causal_lm


def _lora_delta(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """One adapter's update to the layer's weight (peft's ``get_delta_weight``: ``scaling * B A``)."""
    if layer.use_dora.get(adapter, False):
        raise ValueError("merging a LoRA trained on a 4-bit base takes plain LoRA, not DoRA")
    return layer.get_delta_weight(adapter)


def _record(config: BitsAndBytesConfig, dtype: torch.dtype) -> dict[str, Any]:
    settings = config.to_dict()
    return {
        "quantization_config": {key: settings[key] for key in _BNB_KEYS},
        "dtype": str(dtype).removeprefix("torch."),
    }
