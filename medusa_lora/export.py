"""Export heads in the original Medusa layout (``medusa_lm_head.safetensors`` + ``config.json``), the
format FasterDecoding/Medusa and TGI load (vLLM converts it with its Medusa conversion script).

That layout gives every head its own full-vocabulary LM head, so a shared LM head (and a draft
vocabulary) is expanded into per-head copies of the base LM head. Those heads draft for the *task*
model: with a LoRA, pass ``merged_base_dir`` to also write the base with the LoRA merged into it, and
serve that as the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusa_lora.atomic import atomic_directory
from medusa_lora.errors import CheckpointError
from medusa_lora.model import MedusaLoraModel

MEDUSA_HEADS_FILE = "medusa_lm_head.safetensors"


def medusa_state_dict(model: MedusaLoraModel) -> dict[str, torch.Tensor]:
    """Keys ``{head}.{block}.linear.weight|bias`` and ``{head}.{num_layers}.weight`` (the head's LM head)."""
    heads = model.heads
    state = {}
    for k, blocks in enumerate(heads.blocks):
        for j, block in enumerate(blocks):
            state[f"{k}.{j}.linear.weight"] = block.linear.weight
            state[f"{k}.{j}.linear.bias"] = block.linear.bias
        lm_head = model.lm_head if heads.lm_heads is None else heads.lm_heads[k]
        if getattr(lm_head, "bias", None) is not None:
            raise CheckpointError("the Medusa layout has bias-free LM heads; this model's LM head has a bias")
        state[f"{k}.{heads.config.num_layers}.weight"] = lm_head.weight
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


def export_medusa(
    model: MedusaLoraModel,
    directory: str | Path,
    merged_base_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``medusa_lm_head.safetensors`` and ``config.json`` to ``directory`` (atomically)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:  # before merging anything
        raise CheckpointError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
    base_name = model.config.base_model
    if merged_base_dir is not None:
        merged = model.base.merge_and_unload() if model.has_lora else model.base
        merged.save_pretrained(merged_base_dir)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(merged_base_dir)
        model.base = merged
        base_name = str(merged_base_dir)
    elif model.has_lora:
        raise CheckpointError(
            "these heads draft for the LoRA-tuned model: pass merged_base_dir to export it too"
        )
    config = {
        "medusa_num_heads": model.config.num_heads,
        "medusa_num_layers": model.config.num_layers,
        "base_model_name_or_path": base_name,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
    }
    with atomic_directory(directory, overwrite) as staging:
        save_file(medusa_state_dict(model), staging / MEDUSA_HEADS_FILE, metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
