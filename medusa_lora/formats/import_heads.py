"""Bring published Medusa heads (vLLM or TGI/LoRAX layout) in as a heads-only medusa-lora model dir.

LM heads equal to the base model's LM head become the shared LM head again (so an export imports back
bit for bit); other LM heads are kept per head. A vLLM ``token_map`` becomes the draft vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from medusa_lora.errors import CheckpointError, ConfigError, IncompatibleBaseModelError
from medusa_lora.formats.layouts import ReadHeads, read_export
from medusa_lora.model.base import base_fingerprint
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.heads import MedusaHeads
from medusa_lora.model.wrapper import MedusaLoraModel, _load_base


def import_heads(
    directory: str | Path,
    out: str | Path,
    base: str | PreTrainedModel | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the heads exported in ``directory`` to ``out`` as a heads-only model for ``base``.

    ``base`` defaults to the base model the export records (vLLM exports record none: pass it).
    """
    read = read_export(directory)
    base = base if base is not None else read.base_model
    if base is None:
        raise ConfigError(f"{directory} does not record its base model: pass the base model (--model)")
    model, tokenizer, name = _load_base(base, torch.float32)
    lm_weight = model.get_output_embeddings().weight.detach()
    hidden, vocab = model.config.hidden_size, lm_weight.shape[0]
    if (read.hidden_size, read.vocab_size) != (hidden, vocab):
        raise IncompatibleBaseModelError(
            f"the heads in {directory} have hidden size {read.hidden_size} and vocab {read.vocab_size}; "
            f"base model {name!r} has hidden size {hidden} and vocab {vocab}"
        )
    shared = _is_base_lm_head(read, lm_weight)
    config = MedusaConfig(
        num_heads=read.num_heads,
        num_layers=read.num_layers,
        separate_lm_head=not shared,
        draft_vocab_size=0 if read.token_map is None else read.token_map.numel(),
        hidden_size=hidden,
        vocab_size=vocab,
        base_model=name,
        base_fingerprint=base_fingerprint(model),
    )
    heads = MedusaHeads(config)
    state = dict(read.blocks)
    if read.token_map is not None:
        state["draft_vocab"] = read.token_map
    if not shared:
        for k, weight in enumerate(read.lm_heads):
            state[f"lm_heads.{k}.weight"] = _full_rows(weight, read.token_map, vocab)
    try:
        heads.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the heads in {directory} do not fit their own config: {exc}") from exc
    return MedusaLoraModel(model, heads, config, tokenizer).save_pretrained(out, overwrite)


def _is_base_lm_head(read: ReadHeads, lm_weight: torch.Tensor) -> bool:
    """True when the heads have no LM heads of their own, or every one equals the base's (its draft rows)."""
    if read.lm_heads is None:
        return True
    for weight in read.lm_heads:
        rows = lm_weight
        if read.token_map is not None and weight.shape[0] == read.token_map.numel():
            rows = lm_weight[read.token_map]
        if weight.shape != rows.shape or not torch.equal(weight, rows.to(weight.dtype)):
            return False
    return True


def _full_rows(weight: torch.Tensor, token_map: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """An LM head over the full vocabulary: draft-only rows go to their token ids (the rest is never read)."""
    if weight.shape[0] == vocab:
        return weight
    if token_map is None or weight.shape[0] != token_map.numel():
        raise CheckpointError(
            f"an LM head has {weight.shape[0]} rows; expected {vocab} or the token map's size"
        )
    full = weight.new_zeros(vocab, weight.shape[1])
    full[token_map] = weight
    return full
