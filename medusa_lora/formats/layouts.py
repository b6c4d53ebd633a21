"""The Medusa layouts serving engines load, written from and read back into our heads' tensors.

- ``vllm``: vLLM's native Medusa draft model, ``config.json`` (``model_type: medusa``) + ``model.safetensors``
  with ``blocks.{k}.layers.{j}.weight|bias`` and ``lm_heads.{k}.weight``; a draft vocabulary is the
  ``token_map`` tensor with ``truncated_vocab_size``. Matched against vLLM's
  ``vllm/model_executor/models/medusa.py`` (``ResidualBlock``, ``Medusa.__init__``/``compute_logits``/
  ``load_weights``) and ``vllm/transformers_utils/configs/medusa.py`` (``MedusaConfig.from_pretrained``).
- ``tgi`` / ``lorax``: ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``, ``version``,
  ``base_model_name_or_path``) + ``medusa_lm_head.safetensors`` with ``{k}.{j}.linear.weight|bias``. Version 2
  (one block per head, the heads share the base LM head) has no LM-head tensors; version 1 adds each
  head's LM head as ``{k}.{num_layers}.weight``. Matched against TGI's
  ``server/text_generation_server/layers/medusa.py`` (``MedusaHeadV1``/``MedusaHeadV2``) and
  ``layers/speculative.py`` (a config with ``architectures`` is not read as Medusa), and LoRAX's
  ``server/lorax_server/adapters/medusa.py`` (``MedusaConfig.load``, ``MedusaModel`` picks v1/v2) and
  ``adapters/__init__.py`` (``adapter_config.json`` beside a Medusa ``config.json``: LoRA + Medusa).

Neither TGI nor LoRAX has a token map, so heads with a draft vocabulary are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medusa_lora.atomic import read_json_object
from medusa_lora.errors import CheckpointError, ConfigError
from medusa_lora.model.heads import MedusaHeads

CONFIG_FILE = "config.json"
VLLM_WEIGHTS = "model.safetensors"
TGI_WEIGHTS = "medusa_lm_head.safetensors"


@dataclass
class EngineFiles:
    """One export: the ``config.json`` content and the tensors of its safetensors file."""

    config: dict[str, Any]
    weights_file: str
    tensors: dict[str, torch.Tensor]


@dataclass
class ReadHeads:
    """Heads read from an export, as ``MedusaHeads`` keys; ``lm_heads`` are per head, full or draft rows."""

    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    blocks: dict[str, torch.Tensor]  # blocks.{k}.{j}.linear.weight|bias
    lm_heads: list[torch.Tensor] | None  # None: the heads use the base model's LM head
    token_map: torch.Tensor | None  # the draft vocabulary (ids of the rows the heads score)
    base_model: str | None


def vllm_layout(heads: MedusaHeads, lm_head_weight: torch.Tensor) -> EngineFiles:
    """vLLM's Medusa draft model. LM heads keep all vocabulary rows: with a ``token_map`` vLLM's loader
    keeps only the mapped rows itself, and import gets the heads back bit for bit."""
    cfg = heads.config
    if heads.lm_heads is not None and heads.draft_vocab is not None:
        raise ConfigError(
            "these heads have LM heads of their own and a draft vocabulary: vLLM sizes such heads' LM heads to "
            "the full vocabulary, then loads only the token_map rows into them, and fails at start. Export "
            "heads that share the base LM head (separate_lm_head false), or serve these through "
            "medusa_lora.serving.vllm_plugin"
        )
    tensors = {}
    for k, blocks in enumerate(heads.blocks):
        for j, block in enumerate(blocks):
            tensors[f"blocks.{k}.layers.{j}.weight"] = block.linear.weight
            tensors[f"blocks.{k}.layers.{j}.bias"] = block.linear.bias
    shared = heads.lm_heads is None
    if shared:
        tensors["lm_heads.0.weight"] = lm_head_weight
    else:
        for k, lm_head in enumerate(heads.lm_heads):
            tensors[f"lm_heads.{k}.weight"] = lm_head.weight
    config: dict[str, Any] = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "medusa_fc_bias": True,
        "original_lm_head": shared,
    }
    if heads.draft_vocab is not None:
        config["truncated_vocab_size"] = int(heads.draft_vocab.numel())
        tensors["token_map"] = heads.draft_vocab.to(torch.int64)
    return EngineFiles(config, VLLM_WEIGHTS, _plain(tensors))


def tgi_layout(heads: MedusaHeads, lm_head_weight: torch.Tensor, base_model: str, engine: str) -> EngineFiles:
    """TGI / LoRAX: version 2 for one block per head on the shared LM head, else version 1."""
    cfg = heads.config
    if heads.draft_vocab is not None:
        raise ConfigError(
            f"these heads score a draft vocabulary of {cfg.draft_vocab_size} tokens, and {engine}'s Medusa "
            "layout has no token map: its heads would rank the full vocabulary and draft differently. "
            "Export with --format vllm (token_map), or train the heads without draft_vocab_size"
        )
    version = 2 if heads.lm_heads is None and cfg.num_layers == 1 else 1
    tensors = {}
    for k, blocks in enumerate(heads.blocks):
        for j, block in enumerate(blocks):
            tensors[f"{k}.{j}.linear.weight"] = block.linear.weight
            tensors[f"{k}.{j}.linear.bias"] = block.linear.bias
        if version == 1:
            lm_head = lm_head_weight if heads.lm_heads is None else heads.lm_heads[k].weight
            tensors[f"{k}.{cfg.num_layers}.weight"] = lm_head
    config = {  # no "architectures": TGI then takes the speculator for an MLP speculator or nothing
        "medusa_num_heads": cfg.num_heads,
        "medusa_num_layers": cfg.num_layers,
        "version": version,
        "base_model_name_or_path": base_model,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }
    return EngineFiles(config, TGI_WEIGHTS, _plain(tensors))


def read_export(directory: str | Path) -> ReadHeads:
    """Read a vLLM or TGI/LoRAX Medusa export (format told by its ``config.json``)."""
    directory = Path(directory)
    config = read_json_object(directory / CONFIG_FILE, "not a Medusa export")
    if config.get("model_type") == "medusa":
        return _read_vllm(directory, config)
    if "medusa_num_heads" in config:
        return _read_tgi(directory, config)
    raise CheckpointError(
        f"{directory / CONFIG_FILE} is neither a vLLM Medusa config (model_type 'medusa') nor a TGI/LoRAX "
        "one (medusa_num_heads)"
    )


def _read_vllm(directory: Path, config: dict[str, Any]) -> ReadHeads:
    # vLLM's MedusaConfig.from_pretrained: a key with "num" and "heads" is num_heads, "num" and "layers"
    # is num_hidden_layers; its loader strips a "medusa_heads." prefix from weight names.
    for key in list(config):
        if "num" in key and "heads" in key:
            config["num_heads"] = config.pop(key)
        elif "num" in key and "layers" in key:
            config["num_hidden_layers"] = config.pop(key)
    num_heads, num_layers = int(config.get("num_heads", 5)), int(config.get("num_hidden_layers", 1))
    vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no .safetensors file (vLLM reads the weights from those)")
    state = {}
    for path in files:
        state.update({k.replace("medusa_heads.", ""): v for k, v in _load(path).items()})
    truncated = int(config.get("truncated_vocab_size") or vocab)
    token_map = None
    if truncated < vocab:
        token_map = _take(state, "token_map", directory).to(torch.long)
    blocks = {}
    for k in range(num_heads):
        for j in range(num_layers):
            weight = _take(state, f"blocks.{k}.layers.{j}.weight", directory)
            bias = state.pop(f"blocks.{k}.layers.{j}.bias", None) if config.get("medusa_fc_bias") else None
            blocks[f"blocks.{k}.{j}.linear.weight"] = weight
            blocks[f"blocks.{k}.{j}.linear.bias"] = bias if bias is not None else weight.new_zeros(hidden)
    if config.get("original_lm_head"):
        name = "lm_heads.0.weight" if "lm_heads.0.weight" in state else "lm_head.weight"
        lm_heads = [_take(state, name, directory)] * num_heads
    else:
        lm_heads = [_take(state, f"lm_heads.{k}.weight", directory) for k in range(num_heads)]
    return ReadHeads(num_heads, num_layers, hidden, vocab, blocks, lm_heads, token_map, None)


def _read_tgi(directory: Path, config: dict[str, Any]) -> ReadHeads:
    num_heads, num_layers = int(config["medusa_num_heads"]), int(config["medusa_num_layers"])
    state = _load(directory / TGI_WEIGHTS)
    blocks = {}
    for k in range(num_heads):
        for j in range(num_layers):
            for part in ("weight", "bias"):
                blocks[f"blocks.{k}.{j}.linear.{part}"] = _take(state, f"{k}.{j}.linear.{part}", directory)
    lm_heads = None
    if f"0.{num_layers}.weight" in state:  # version 1: each head owns an LM head
        lm_heads = [_take(state, f"{k}.{num_layers}.weight", directory) for k in range(num_heads)]
    first = blocks.get("blocks.0.0.linear.weight")
    hidden = int(config.get("hidden_size") or (first.shape[0] if first is not None else 0))
    vocab = int(config.get("vocab_size") or (lm_heads[0].shape[0] if lm_heads else 0))
    base = config.get("base_model_name_or_path")
    return ReadHeads(num_heads, num_layers, hidden, vocab, blocks, lm_heads, None, base)


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that share no storage (tied weights would make safetensors refuse the file)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (only safetensors Medusa weights are read)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def _take(state: dict[str, torch.Tensor], name: str, directory: Path) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{directory}: tensor {name!r} is missing from the Medusa weights")
    return state[name]
