"""The Medusa heads' configuration: a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_lora.atomic import atomic_write_text, read_json_object
from medusa_lora.errors import ConfigError

CONFIG_NAME = "medusa_config.json"


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys are a ``ConfigError`` naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
    return cls(**data)


@dataclass
class MedusaConfig:
    """How the Medusa heads are built, and which base model they belong to.

    ``hidden_size``, ``vocab_size``, ``base_model``, ``base_fingerprint`` and ``base_quantization`` are filled in
    from the base model when the heads are created; they are checked again when the heads are loaded.
    """

    num_heads: int = 4
    num_layers: int = 1
    separate_lm_head: bool = False
    draft_vocab_size: int = 0  # 0: the heads score the full vocabulary
    root_conditioned: bool = False  # each head also sees the embedding of the token after its input position
    path_conditioned: bool = False  # head k also sees the root and the k draft tokens before its own (Hydra)
    hidden_size: int = 0
    vocab_size: int = 0
    base_model: str = ""
    base_fingerprint: str = ""
    # QLoRA: how bitsandbytes held the base in 4-bit in training (``model.qlora``); loading quantizes it so again
    base_quantization: dict[str, Any] | None = field(default=None)
    tree: list[list[int]] | None = field(default=None)  # the calibrated tree (top-k paths)
    hit_rates: list[list[float]] | None = field(default=None)  # per head, per top-k rank, on held-out data
    # per held-out completion, one word per token: the ranks (0-9) of the model's greedy tokens after it among
    # heads 0, 1, ...'s candidates, up to the first miss (``tree.walked_accepted_length``)
    greedy_ranks: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ConfigError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 0:
            raise ConfigError(f"num_layers must be >= 0, got {self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedusaConfig:
        return dataclass_from_dict(cls, data, CONFIG_NAME)

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> MedusaConfig:
        missing = f"{directory} is not a medusa-lora model directory"
        data = read_json_object(Path(directory, CONFIG_NAME), missing)
        return cls.from_dict(data)
