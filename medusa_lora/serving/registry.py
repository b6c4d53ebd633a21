"""The served models: one copy of the base weights, each adapter's LoRA loaded into one PEFT model under its
own adapter name, and per adapter a ``MedusaLoraModel`` view with its own heads, config and tree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa_lora.decoding import eos_token_ids
from medusa_lora.errors import CheckpointError, ConfigError
from medusa_lora.model.base import load_base_model, load_tokenizer
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MedusaLoraModel, load_heads
from medusa_lora.prompting import PromptFormat
from medusa_lora.trees.choice import choose_tree, parse_tree_spec
from medusa_lora.trees.tree import TokenTree


@dataclass(frozen=True)
class Served:
    """One name a request's ``model`` can pick: an adapter, or the base alone (``lora`` and ``tree`` None)."""

    name: str
    model: MedusaLoraModel
    lora: str | None  # the PEFT adapter name, or None: the base weights without any LoRA
    tree: TokenTree | None  # None: plain decoding only (the base alone has no trained heads)
    directory: Path | None = None

    @property
    def speculative(self) -> bool:
        return self.tree is not None and self.tree.size > 1


class Registry:
    """Loads the base once and adapters onto it; ``active(served)`` switches the weights a request runs on.

    Adapters are loaded fully (config, heads, LoRA) before they are listed, and a LoRA that fails to load is
    removed again, so a failed ``add`` leaves the registry as it was. Not thread-safe: the one worker thread
    that runs requests owns it.
    """

    def __init__(self, base_name: str, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._causal_lm = base
        self._peft: PeftModel | None = None
        self._models: dict[str, Served] = {}
        plain = MedusaLoraModel(base, None, MedusaConfig(), tokenizer)
        self._models[base_name] = Served(base_name, plain, None, None)
        self.chat_format = PromptFormat(tokenizer, True) if tokenizer.chat_template else None
        self.raw_format = PromptFormat(tokenizer, False)
        self.eos_ids = eos_token_ids(plain)

    @classmethod
    def load(
        cls,
        base_name: str,
        adapters: dict[str, Path],
        dtype: torch.dtype = torch.float32,
        tree: int | str = "calibrated",
        device: str | None = None,
        served_base_name: str | None = None,
    ) -> Registry:
        """The base ``base_name`` (hub id, dir or ``smollm2-135m``; served as ``served_base_name``, default
        ``base_name``) with every adapter in ``adapters``."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        base = load_base_model(base_name, dtype).to(device)
        registry = cls(served_base_name or base_name, base, load_tokenizer(base_name))
        for name, directory in adapters.items():
            registry.add(name, directory, tree)
        return registry

    # ----------------------------------------------------------------- lookup
    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> Served | None:
        return self._models.get(name)

    def active(self, served: Served) -> AbstractContextManager[None]:
        """Run the block on ``served``'s weights: its LoRA, or the base with every LoRA off."""
        return self._lora_active(served.lora)

    @contextmanager
    def _lora_active(self, lora: str | None) -> Iterator[None]:
        if self._peft is None:
            yield
        elif lora is None:
            with self._peft.disable_adapter():
                yield
        else:
            self._peft.set_adapter(lora, inference_mode=True)
            yield

    # ----------------------------------------------------------------- loading
    def add(self, name: str, directory: str | Path, tree: int | str = "calibrated") -> Served:
        """Load the medusa-lora dir ``directory`` (heads, and a LoRA if it has one) as model ``name``."""
        directory = Path(directory)
        tree = parse_tree_spec(tree)
        if not name or name in self._models:
            raise ConfigError(f"adapter name {name!r} is empty or already served ({', '.join(self._models)})")
        config = MedusaConfig.load(directory)
        heads = load_heads(self._causal_lm, directory, config)
        lora = name if (directory / ADAPTER_CONFIG).is_file() else None
        if lora is not None:
            self._load_lora(lora, directory)
        try:
            model = MedusaLoraModel(self._peft or self._causal_lm, heads, config, self.tokenizer)
            with self._lora_active(lora):
                served = Served(name, model, lora, choose_tree(model, tree).tree, directory)
        except BaseException:
            if lora is not None:
                self._peft.delete_adapter(lora)
            raise
        self._models[name] = served
        return served

    def _load_lora(self, name: str, directory: Path) -> None:
        if not (directory / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS} is missing (only safetensors adapters are loaded)"
            )
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._causal_lm, directory, adapter_name=name)
            else:
                self._peft.load_adapter(directory, adapter_name=name)
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            if self._peft is not None and name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            raise CheckpointError(f"cannot load the LoRA adapter in {directory}: {exc}") from exc
        self._peft.eval()
