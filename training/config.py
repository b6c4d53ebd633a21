"""``TrainConfig``: every training setting, loaded from YAML with ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medusa_lora.errors import ConfigError

MODES = ("medusa-lora", "heads", "lora")
HEAD_TARGETS = ("labels", "distill")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """One training run. Paths are relative to the working directory.

    Modes: ``medusa-lora`` trains a LoRA and the heads together (Medusa-2), ``heads`` trains only the
    heads on the frozen base (Medusa-1), ``lora`` trains only the LoRA with the LM loss.
    """

    # model
    model: str = "smollm2-135m"  # hub id, local dir or ``smollm2-135m``
    mode: str = "medusa-lora"
    # data: local files (jsonl/json/parquet/csv) or a hub dataset
    train_file: str | None = None
    validation_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    validation_split: str | None = None  # hub only; without validation data a holdout is split off train
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"  # chat records; the last (assistant) message is the completion
    use_chat_template: bool = True
    max_length: int = 1024  # longer examples lose completion tokens (counted and logged)
    max_train_samples: int | None = None
    # LoRA (modes medusa-lora and lora)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    lora_last_layers: int | None = None  # LoRA only on the last N decoder layers (backprop stops there)
    # Medusa heads (modes medusa-lora and heads)
    num_heads: int = 4
    num_head_layers: int = 1
    head_targets: str = "labels"  # labels: the data's tokens; distill: the model's own distribution
    head_loss_decay: float = 0.8  # head k's loss is weighted decay**k
    head_loss_weight: float = 0.2  # joint mode: weight of the summed head loss next to the LM loss
    heads_warmup_steps: int = 0  # joint mode: the head weight ramps from 0 over these steps
    draft_vocab_size: int = 0  # >0: the heads score only the N most frequent label tokens of the train data
    # optimisation
    lr_lora: float = 2e-4
    lr_heads: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float = 1.0
    warmup_ratio: float = 0.05
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPU, no on CPU
    gradient_checkpointing: bool = False
    # output
    output_dir: str = "runs/medusa-lora"
    overwrite_output: bool = False  # start afresh even if output_dir holds an earlier run
    save_every: int = 0  # checkpoint every N optimizer steps (0: none)
    keep_checkpoints: int = 2
    log_every: int = 10
    # calibration on held-out data, after training
    calibration_samples: int = 100
    tree_size: int = 16
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        _check_types(self)
        _choice("mode", self.mode, MODES)
        _choice("head_targets", self.head_targets, HEAD_TARGETS)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if (self.train_file is None) == (self.dataset is None):
            raise ConfigError(
                "give exactly one of train_file (a local file) and dataset (a hub dataset name)"
            )
        if self.validation_file is not None and self.dataset is not None:
            raise ConfigError("validation_file goes with train_file; with a hub dataset use validation_split")
        for name in (
            "max_length",
            "num_heads",
            "batch_size",
            "gradient_accumulation_steps",
            "lora_r",
            "log_every",
            "calibration_samples",
            "tree_size",
            "eval_batch_size",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "num_head_layers",
            "heads_warmup_steps",
            "draft_vocab_size",
            "save_every",
            "weight_decay",
            "max_grad_norm",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 (or null to use epochs), got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @property
    def trains_lora(self) -> bool:
        return self.mode in ("medusa-lora", "lora")

    @property
    def trains_heads(self) -> bool:
        return self.mode in ("medusa-lora", "heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The YAML file at ``path`` (optional), then ``key=value`` overrides parsed as YAML scalars."""
    data: dict[str, Any] = {}
    where = "--set"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        data.update(loaded or {})
    sets = parse_overrides(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for source, values in ((where, data), ("--set", sets)):
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed keys are {sorted(known)}")
    try:
        return TrainConfig(**{**data, **sets})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr_heads=1e-3", "lora_target_modules=[q_proj, v_proj]"]`` -> a dict of YAML-parsed values."""
    result = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            result[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from exc
    return result


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_types(config: TrainConfig) -> None:
    """Coerce ints to floats and numeric strings (YAML reads ``1e-3`` as text) to numbers; reject the rest."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        setattr(config, f.name, _coerce(f.name, value, hints[f.name]))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if option is str and isinstance(value, str):
            return value
        if (
            typing.get_origin(option) is list
            and isinstance(value, list)
            and all(isinstance(v, str) for v in value)
        ):
            return list(value)
    raise ConfigError(f"{name} must be {_describe(options)}, got {value!r}")


def _describe(options: tuple[Any, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names.get(o, "a list of strings") for o in options)
