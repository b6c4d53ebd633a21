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
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
BNB_4BIT_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting: ``low``/``high`` bounds (None: unbounded), each open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, low_open=True)

# Every numeric setting and its allowed values (null, where a setting allows it, is always allowed).
RANGES: dict[str, Range] = {
    "max_length": Range(2),  # a prompt token and a completion token
    "max_train_samples": AT_LEAST_1,
    "lora_r": AT_LEAST_1,
    "lora_alpha": ABOVE_0,
    "lora_dropout": Range(0, 1, high_open=True),
    "lora_last_layers": AT_LEAST_1,  # and at most the model's layers (checked when the model is built)
    "num_heads": AT_LEAST_1,
    "num_head_layers": AT_LEAST_0,
    "head_loss_decay": Range(0, 1),
    "head_loss_weight": AT_LEAST_0,
    "heads_warmup_steps": AT_LEAST_0,
    "draft_vocab_size": AT_LEAST_0,  # 0: the full vocabulary
    "heads_replay_epochs": AT_LEAST_0,  # 0: no replay
    "heads_replay_steps": AT_LEAST_0,  # 0: every step's inputs
    "heads_replay_batch_size": AT_LEAST_1,
    "lr_heads_replay": ABOVE_0,
    "lr_lora": ABOVE_0,
    "lr_heads": ABOVE_0,
    "weight_decay": AT_LEAST_0,
    "max_grad_norm": AT_LEAST_0,  # 0: no clipping
    "batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "max_steps": AT_LEAST_1,  # null: run ``epochs``
    "epochs": ABOVE_0,
    "warmup_ratio": Range(0, 1, high_open=True),
    "seed": Range(0, 2**32 - 1),  # numpy's seed range
    "save_every": AT_LEAST_0,  # 0: no checkpoints
    "keep_checkpoints": AT_LEAST_1,
    "log_every": AT_LEAST_1,
    "calibration_samples": AT_LEAST_1,
    "eval_every": AT_LEAST_0,  # 0: no evaluation during training
    "early_stopping_patience": AT_LEAST_0,  # 0: no early stopping
    "tree_size": AT_LEAST_1,
    "eval_batch_size": AT_LEAST_1,
}


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
    # QLoRA (modes medusa-lora and lora): the base's linear layers held in 4-bit by bitsandbytes, frozen; the LoRA
    # and the heads train on its outputs, and merging dequantizes it exactly as training computed with it
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # nf4 (QLoRA's 4-bit NormalFloat) or fp4
    bnb_4bit_use_double_quant: bool = False  # also quantize the per-block scales (0.37 bits a weight less)
    bnb_4bit_compute_dtype: str = "float32"  # the matmuls' dtype: float32, bfloat16 or float16
    # Medusa heads (modes medusa-lora and heads)
    num_heads: int = 4
    num_head_layers: int = 1
    head_targets: str = "labels"  # labels: the data's tokens; distill: the model's own distribution
    head_loss_decay: float = 0.8  # head k's loss is weighted decay**k
    head_loss_weight: float = 0.2  # joint mode: weight of the summed head loss next to the LM loss
    heads_warmup_steps: int = 0  # joint mode: the head weight ramps from 0 over these steps
    draft_vocab_size: int = 0  # >0: the heads score only the N most frequent label tokens of the train data
    root_conditioned_heads: bool = False  # heads also see the token after their position (the root)
    path_conditioned_heads: bool = False  # head k also sees the root and the k draft tokens before its own
    # heads replay (modes medusa-lora and heads): after the last step the heads train alone over the inputs
    # training gave them (last hidden states, tokens, targets), cached as it ran: no decoder forwards
    heads_replay_epochs: float = 0.0  # passes over the cache (0: no replay); labels targets only
    heads_replay_steps: int = 0  # cache the inputs of the last N optimizer steps (0: of every step)
    heads_replay_batch_size: int = 256  # positions per replay step
    lr_heads_replay: float = 1e-3  # the replay's peak learning rate (cosine to 0 over the replay)
    # optimisation
    lr_lora: float = 2e-4
    lr_heads: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4  # per process
    # batches of examples of similar lengths, in a random order: less padding, so cheaper steps where lengths vary
    group_by_length: bool = False
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float = 1.0
    warmup_ratio: float = 0.05
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPU, no on CPU
    gradient_checkpointing: bool = False
    # sharding and the frozen base's precision
    fsdp: bool = False  # FSDP2 over the processes: each decoder layer and the rest sharded (also --use_fsdp)
    base_dtype: str = "float32"  # the frozen base's weights; LoRA and heads train in float32 either way
    # output
    output_dir: str = "runs/medusa-lora"
    overwrite_output: bool = False  # start afresh even if output_dir holds an earlier run
    save_every: int = 0  # checkpoint every N optimizer steps (0: none)
    keep_checkpoints: int = 2
    log_every: int = 10
    # calibration on held-out data, after training
    calibration_samples: int = 100
    eval_every: int = 0  # >0: every N optimizer steps, measure and log held-out top-1 (calibration_samples)
    early_stopping_patience: int = 0  # >0: stop after N such evaluations without a better held-out top-1
    tree_size: int = 16
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        _check_types(self)
        _choice("mode", self.mode, MODES)
        _choice("head_targets", self.head_targets, HEAD_TARGETS)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, BNB_4BIT_QUANT_TYPES)
        _choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, BNB_4BIT_COMPUTE_DTYPES)
        _check_4bit(self)
        if (self.train_file is None) == (self.dataset is None):
            raise ConfigError(
                "give exactly one of train_file (a local file) and dataset (a hub dataset name)"
            )
        if self.validation_file is not None and self.dataset is not None:
            raise ConfigError("validation_file goes with train_file; with a hub dataset use validation_split")
        _check_ranges(self)
        if self.heads_replay_epochs and not self.trains_heads:
            raise FieldError("heads_replay_epochs", f"needs a mode that trains the heads, not {self.mode!r}")
        if self.heads_replay_epochs and self.head_targets != "labels":
            raise FieldError(
                "heads_replay_epochs", "replays the data's tokens as targets: it needs head_targets: labels"
            )
        _choice("base_dtype", self.base_dtype, BASE_DTYPES)

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
    except FieldError as exc:
        source = where if exc.field not in sets else "--set" if path is None else f"--set (over {path})"
        raise ConfigError(f"{source}: {exc}") from exc
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


class FieldError(ConfigError):
    """A bad value of one setting; ``field`` names it (``load_config`` says where the value came from)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FieldError(name, f"must be one of {list(allowed)}, got {value!r}")


def _check_4bit(config: TrainConfig) -> None:
    """``load_in_4bit`` needs a LoRA to train and bitsandbytes; the ``bnb_4bit_*`` settings need it."""
    if not config.load_in_4bit:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            if getattr(config, name) != defaults[name]:
                raise FieldError(name, "applies to a 4-bit base only: set load_in_4bit: true as well")
        return
    if config.mode == "heads":
        raise FieldError(
            "load_in_4bit",
            "trains a LoRA on a 4-bit base (QLoRA); mode heads makes heads for the base as it is, which a 4-bit "
            "base is not (its outputs differ): use mode medusa-lora or lora",
        )
    from medusa_lora.model.qlora import INSTALL_HINT, bitsandbytes_available  # imports torch: only when asked

    if not bitsandbytes_available():
        raise FieldError("load_in_4bit", f"needs bitsandbytes, which is not installed: {INSTALL_HINT}")


def _check_ranges(config: TrainConfig) -> None:
    for name, allowed in RANGES.items():
        value = getattr(config, name)
        if value is not None and value not in allowed:
            raise FieldError(name, f"must be {allowed}, got {value}")


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
    raise FieldError(name, f"must be {_describe(options)}, got {value!r}")


def _describe(options: tuple[Any, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names.get(o, "a list of strings") for o in options)
