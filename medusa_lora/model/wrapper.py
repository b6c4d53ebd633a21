"""``MedusaLoraModel``: a causal LM, an optional PEFT LoRA, and Medusa heads, saved and loaded together."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from medusa_lora.atomic import atomic_directory
from medusa_lora.errors import CheckpointError, ConfigError, IncompatibleBaseModelError
from medusa_lora.model.base import base_fingerprint, cache_argument, load_base_model, load_tokenizer
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.heads import HEADS_FILE, MedusaHeads, load_saved_heads
from medusa_lora.model.qlora import describe, is_4bit, load_4bit_base, quantization_record
from medusa_lora.verification.attention import use_tree_attention

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class MedusaOutput:
    """One forward: the LM logits (B, T, V), the heads' logits (K, B, T, V) and the last hidden state."""

    logits: torch.Tensor
    head_logits: torch.Tensor
    hidden_states: torch.Tensor


class MedusaLoraModel(nn.Module):
    """A Hugging Face causal LM (optionally wrapped by a PEFT LoRA) plus ``MedusaHeads`` (None: the base alone,
    which decodes plainly or with drafters that need no heads).

    The causal LM's attention goes through ``verification.attention``'s tree attention, which is transformers'
    SDPA for every forward that passes no tree."""

    def __init__(
        self,
        base: PreTrainedModel | PeftModel,
        heads: MedusaHeads | None,
        config: MedusaConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.heads = heads
        self.config = config
        self.tokenizer = tokenizer
        use_tree_attention(self.causal_lm)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_base(
        cls,
        base: str | PreTrainedModel,
        medusa_config: MedusaConfig | None = None,
        lora_config: LoraConfig | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MedusaLoraModel:
        """Fresh (identity-initialised) heads, and a fresh LoRA when ``lora_config`` is given; a base held in 4-bit
        by bitsandbytes (QLoRA) is recorded as such (``MedusaConfig.base_quantization``)."""
        model, tokenizer, name = _load_base(base, dtype)
        config = copy.deepcopy(medusa_config) if medusa_config else MedusaConfig()
        config.hidden_size = model.config.hidden_size
        config.vocab_size = model.get_output_embeddings().weight.shape[0]
        config.base_model = name
        config.base_fingerprint = base_fingerprint(model)
        config.base_quantization = quantization_record(model)
        heads = MedusaHeads(config, model.get_output_embeddings().weight.detach())
        heads.to(device=model.device, dtype=model.dtype)
        if lora_config is not None:
            model = get_peft_model(model, copy.deepcopy(lora_config))
        return cls(model, heads, config, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        base: str | PreTrainedModel | None,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        is_trainable: bool = False,
    ) -> MedusaLoraModel:
        """Load what ``save_pretrained`` wrote; ``base=None`` uses the base recorded in the config. A base named
        for a model trained on a 4-bit base (QLoRA) is quantized as in training, its LoRA left unmerged."""
        directory = Path(directory)
        config = MedusaConfig.load(directory)
        model, tokenizer, _ = _load_base(
            base if base is not None else config.base_model, dtype, config.base_quantization
        )
        heads = load_heads(model, directory, config)
        if (directory / ADAPTER_CONFIG).is_file():
            if not (directory / ADAPTER_WEIGHTS).is_file():
                raise CheckpointError(
                    f"{directory / ADAPTER_WEIGHTS} is missing (only safetensors adapters are loaded)"
                )
            try:
                model = PeftModel.from_pretrained(model, directory, is_trainable=is_trainable)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the LoRA adapter in {directory}: {exc}") from exc
        return cls(model, heads, config, tokenizer)

    # ----------------------------------------------------------------- parts
    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers model (with LoRA layers injected, when there is a LoRA)."""
        return self.base.get_base_model() if isinstance(self.base, PeftModel) else self.base

    @property
    def decoder(self) -> nn.Module:
        """The transformer without its LM head: returns the last (normed) hidden state."""
        return self.causal_lm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def model_config(self):
        return self.causal_lm.config

    @property
    def has_lora(self) -> bool:
        return isinstance(self.base, PeftModel)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Let the heads score only ``token_ids`` (distinct ids), and record their number in the config."""
        if self.heads is None:
            raise ConfigError("this model has no Medusa heads")
        self.heads.set_draft_vocab(token_ids)
        self.config.draft_vocab_size = self.heads.vocab_size

    # ----------------------------------------------------------------- forward
    def hidden_states(self, input_ids: torch.Tensor, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        """(B, T) -> (B, T, H): the last hidden state, reading and extending ``cache`` when given; ``kwargs``
        go to the transformers decoder."""
        decoder = self.decoder
        if cache is not None:
            kwargs[cache_argument(decoder)] = cache
        return decoder(input_ids=input_ids, **kwargs).last_hidden_state

    def draft_logits(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor | int,
        path_ids: torch.Tensor | None = None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """The heads' logits (K, ..., V') at positions with hidden states ``hidden`` (..., H) whose next tokens are
        ``next_ids`` (...), read through this model's embeddings and LM head (``MedusaHeads.draft_logits``)."""
        if self.heads is None:
            raise ConfigError("this model has no Medusa heads to draft with")
        return self.heads.draft_logits(
            hidden, next_ids, self.causal_lm.get_input_embeddings(), self.lm_head, path_ids, depth
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> MedusaOutput:
        """Logits and head logits at every position; the heads at position t see token t + 1 (at the last
        position, the model's greedy next token), path-conditioned heads then their own top-1 drafts."""
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, use_cache=False)
        logits = self.lm_head(hidden)
        next_ids = torch.cat([input_ids[:, 1:], logits[:, -1:].argmax(-1)], dim=1)
        return MedusaOutput(logits, self.draft_logits(hidden, next_ids), hidden)

    # ----------------------------------------------------------------- saving
    def save_pretrained(
        self,
        directory: str | Path,
        overwrite: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the PEFT adapter (if any), the heads (safetensors) and ``medusa_config.json`` atomically.

        The files go to a temporary sibling directory first and replace ``directory`` in one rename,
        so a crash never leaves a half-written model. An existing directory is only replaced with
        ``overwrite=True``. ``state_dict`` (this module's names: ``heads.*`` and the LoRA's ``base.*``) is
        saved instead of the module's own tensors: what a trainer that shards them gathered whole.
        """
        if self.heads is None:
            raise ConfigError("this model has no Medusa heads to save")
        heads_state, base_state = self.heads.state_dict(), None
        if state_dict is not None:
            heads_state, base_state = _part(state_dict, "heads."), _part(state_dict, "base.")
        with atomic_directory(directory, overwrite) as staging:
            if isinstance(self.base, PeftModel):
                self.base.save_pretrained(staging, safe_serialization=True, state_dict=base_state)
            state = {k: v.detach().contiguous().cpu() for k, v in heads_state.items()}
            save_file(state, staging / HEADS_FILE, metadata={"format": "pt"})
            self.config.save(staging)
        return Path(directory)


def _part(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def load_heads(model: PreTrainedModel, directory: Path, config: MedusaConfig) -> MedusaHeads:
    """The heads saved in ``directory``, checked against ``model`` and placed on its device and dtype."""
    _check_compatible(config, model, directory)
    return load_saved_heads(directory, config).to(device=model.device, dtype=model.dtype)


def _load_base(
    base: str | PreTrainedModel, dtype: torch.dtype, quantization: dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, str]:
    if isinstance(base, str):
        model = load_4bit_base(base, quantization, dtype) if quantization else load_base_model(base, dtype)
        return model, load_tokenizer(base), base
    return base, None, str(base.config.name_or_path)


def _check_compatible(config: MedusaConfig, model: PreTrainedModel, directory: Path) -> None:
    hidden = model.config.hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]
    if (config.hidden_size, config.vocab_size) != (hidden, vocab):
        raise IncompatibleBaseModelError(
            f"the heads in {directory} were trained for hidden size {config.hidden_size} and vocab "
            f"{config.vocab_size}, but the base model has hidden size {hidden} and vocab {vocab}"
        )
    if config.base_quantization and not is_4bit(model):
        raise IncompatibleBaseModelError(
            f"the model in {directory} was trained on a 4-bit base (QLoRA: {describe(config.base_quantization)}), "
            "and this base is not quantized: give the base by name (it is quantized again as in training), or "
            "serve the merged model (for_inference, or export with a merged base)"
        )
    fingerprint = base_fingerprint(model)
    if config.base_fingerprint and config.base_fingerprint != fingerprint:
        raise IncompatibleBaseModelError(
            f"the heads in {directory} were trained on base model {config.base_model!r} (fingerprint "
            f"{config.base_fingerprint}); the given base model's weights differ (fingerprint {fingerprint})"
        )
