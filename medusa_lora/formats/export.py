"""Export heads for the engines users serve with: vLLM, TGI and LoRAX (layouts in ``serving_formats``).

The heads draft for the *task* model. vLLM and TGI serve one base model, so a model with a LoRA needs
``merged_base_dir``: the base with the LoRA merged in (a copy: the caller's model is left untouched),
written atomically; a model trained on a 4-bit base (QLoRA) needs it too, and gets that base dequantized
as training computed with it (``model.qlora``). LoRAX applies the LoRA itself: its export is one adapter
directory holding the PEFT adapter and the Medusa files together.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa_lora.atomic import atomic_directory
from medusa_lora.errors import CheckpointError, ConfigError
from medusa_lora.formats.layouts import CONFIG_FILE, EngineFiles, tgi_layout, vllm_layout
from medusa_lora.model.base import resolve_model_path
from medusa_lora.model.qlora import is_4bit, merge_into_base
from medusa_lora.model.wrapper import MedusaLoraModel

FORMATS = ("vllm", "tgi", "lorax")


def export_heads(
    model: MedusaLoraModel,
    directory: str | Path,
    format: str,
    merged_base_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s heads to ``directory`` in ``format`` (one of ``FORMATS``), atomically.

    Refused (``ConfigError``) when the format cannot express the heads exactly; an existing non-empty
    ``directory`` or ``merged_base_dir`` is only replaced with ``overwrite``.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    directory = Path(directory)
    targets = [directory] + ([Path(merged_base_dir)] if merged_base_dir is not None else [])
    for target in targets:  # checked before any work is done
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise CheckpointError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    if model.heads.conditioning_tokens:
        raise ConfigError(
            "these heads are root- or path-conditioned (they see the embeddings of the tokens after their "
            f"position), which no engine's Medusa layout expresses: {format} would run them without it and "
            "draft differently. Serve them in vLLM through medusa_lora.serving.vllm_plugin (docs/vllm.md), or "
            "export heads trained without root_conditioned_heads and path_conditioned_heads"
        )
    quantized = is_4bit(model.causal_lm)
    if format == "lorax" and quantized:
        raise ConfigError(
            "this model was trained on a 4-bit base (QLoRA), and LoRAX would apply its LoRA to its own base: "
            "export for vllm or tgi with merged_base_dir (the base dequantized as trained, the LoRA merged in)"
        )
    if format == "lorax" and merged_base_dir is not None:
        raise ConfigError("LoRAX applies the LoRA itself: export for LoRAX without a merged base")
    if format != "lorax" and (model.has_lora or quantized) and merged_base_dir is None:
        raise CheckpointError(
            f"these heads draft for the {'QLoRA' if quantized else 'LoRA'}-tuned model, and {format} serves one "
            "base model: pass merged_base_dir to also write the base with the LoRA merged in"
        )
    lm_head_weight = _lm_head_weight(model)
    if merged_base_dir is not None:
        base_name = str(Path(merged_base_dir).resolve())
    else:
        base_name = resolve_model_path(model.config.base_model)  # the demo model's name -> its dir
    layout = (  # before writing anything: refuses heads the format cannot express
        vllm_layout(model.heads, lm_head_weight)
        if format == "vllm"
        else tgi_layout(model.heads, lm_head_weight, base_name, format)
    )
    if merged_base_dir is not None:
        write_merged_base(model, merged_base_dir, overwrite)
    with atomic_directory(directory, overwrite) as staging:
        if format == "lorax" and model.has_lora:
            model.base.save_pretrained(staging, safe_serialization=True)  # adapter_config.json + weights
        _write_layout(layout, staging)
    return directory


def write_merged_base(model: MedusaLoraModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the base with the LoRA merged in (safetensors + tokenizer), atomically; ``model`` is unchanged. A
    4-bit base is written dequantized, as training computed with it (``qlora.merge_into_base``)."""
    changes = model.has_lora or is_4bit(model.causal_lm)
    merged = merge_into_base(copy.deepcopy(model.base)) if changes else model.base
    with atomic_directory(directory, overwrite) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
    return Path(directory)


def _lm_head_weight(model: MedusaLoraModel) -> torch.Tensor:
    """The base LM head's weight; the engines' Medusa LM heads have no bias and no LoRA."""
    lm_head = model.lm_head
    if hasattr(lm_head, "base_layer"):
        raise ConfigError("the LoRA adapts the LM head, which the exported heads could not reproduce")
    if getattr(lm_head, "bias", None) is not None:
        raise ConfigError("the base LM head has a bias; the engines' Medusa LM heads have none")
    return lm_head.weight


def _write_layout(layout: EngineFiles, directory: Path) -> None:
    save_file(layout.tensors, directory / layout.weights_file, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(layout.config, indent=2) + "\n")
