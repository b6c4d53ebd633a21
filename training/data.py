"""Training data: local files or a hub dataset, prompt/completion or chat records, tokenized with labels.

The prompt is tokenized exactly as ``generate()`` sees it at inference: the chat template applied to
the user turn with ``add_generation_prompt=True`` (or the raw prompt text), without added special
tokens. The completion follows, closed by the template's end-of-turn token; only completion tokens
carry labels.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from medusa_lora.errors import ConfigError
from medusa_lora.heads import IGNORE_INDEX
from medusa_lora.training.config import TrainConfig

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_TYPES = ("string", "large_string")
OK, TRUNCATED, DROPPED = 0, 1, 2


@dataclass
class TrainingData:
    """Tokenized splits (columns ``input_ids`` and ``labels``) and the collator that pads them."""

    train: datasets.Dataset
    validation: datasets.Dataset
    collator: DataCollatorForSeq2Seq


def load_training_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """Read, check and tokenize the train and validation data named by ``cfg``."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if cfg.use_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer of {cfg.model} has no chat template; set use_chat_template: false")
    encoder = Encoder(tokenizer, cfg.use_chat_template, cfg.max_length)
    train, train_name = _read(cfg, cfg.train_file, cfg.train_split)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.validation_file is not None or cfg.validation_split is not None:
        validation, validation_name = _read(cfg, cfg.validation_file, cfg.validation_split)
    else:
        if len(train) < 2:
            raise ConfigError(f"{train_name}: too few examples to hold some out; give validation data")
        held_out = min(cfg.calibration_samples, max(1, len(train) // 10))
        logger.info(
            "no validation data: holding out %d of %d examples of %s", held_out, len(train), train_name
        )
        split = train.train_test_split(test_size=held_out, seed=cfg.seed)
        train, validation, validation_name = split["train"], split["test"], f"{train_name} (held out)"
    return TrainingData(
        train=tokenize(train, train_name, cfg, encoder),
        validation=tokenize(validation, validation_name, cfg, encoder),
        collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
    )


def read_records(path: str | Path) -> datasets.Dataset:
    """A local jsonl/json/parquet/csv file as a ``datasets.Dataset``; empty or unreadable files are errors."""
    path = Path(path)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{path}: unsupported data file type; use one of {sorted(BUILDERS)}")
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    empty = ConfigError(f"{path} is empty: it holds no examples")
    if path.stat().st_size == 0:
        raise empty
    try:
        records = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data")
    except Exception as exc:  # datasets raises many types (arrow, json, generation errors)
        if not path.read_bytes().strip():
            raise empty from exc
        raise ConfigError(f"cannot read {path} as {builder}: {exc}") from exc
    if len(records) == 0:
        raise empty
    return records


def _read(cfg: TrainConfig, path: str | None, split: str | None) -> tuple[datasets.Dataset, str]:
    if path is not None:
        return read_records(path), str(path)
    name = f"{cfg.dataset}[{split}]"
    try:
        records = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as exc:  # hub, network and split errors
        raise ConfigError(f"cannot load dataset {name}: {exc}") from exc
    if len(records) == 0:
        raise ConfigError(f"{name} is empty: it holds no examples")
    return records, name


class Encoder:
    """(prompt or chat turns, completion) -> ``input_ids`` and ``labels`` of at most ``max_length``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.max_length = max_length
        self.end_ids = end_of_turn_ids(tokenizer) if use_chat_template else _eos(tokenizer)

    def __call__(self, prompt: str | list[dict[str, str]], completion: str) -> dict[str, Any]:
        text = prompt_text(self.tokenizer, prompt, self.use_chat_template)
        prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        completion_ids = self.tokenizer(completion, add_special_tokens=False).input_ids + self.end_ids
        status = OK
        if len(prompt_ids) >= self.max_length:
            status, completion_ids = DROPPED, []
        elif len(prompt_ids) + len(completion_ids) > self.max_length:
            status, completion_ids = TRUNCATED, completion_ids[: self.max_length - len(prompt_ids)]
        return {
            "input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            "status": status,
        }


def prompt_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]], use_chat_template: bool
) -> str:
    """What ``generate()`` is given: the template's user turn(s) plus the assistant header, or the raw text."""
    if not use_chat_template:
        return prompt
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the chat template writes after an assistant message, up to its first special token.

    For ChatML templates this is ``<|im_end|>``: the token generation stops at. Falls back to EOS.
    """
    user = [{"role": "user", "content": "?"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "x"}], tokenize=False)
    if full.startswith(prompt + "x"):
        suffix = tokenizer(full[len(prompt) + 1 :], add_special_tokens=False).input_ids
        special = set(tokenizer.all_special_ids)
        for i, token in enumerate(suffix):
            if token in special:
                return suffix[: i + 1]
    return _eos(tokenizer)


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize(records: datasets.Dataset, name: str, cfg: TrainConfig, encoder: Encoder) -> datasets.Dataset:
    """Check the fields, tokenize, report and drop what does not fit ``max_length``."""
    fields = _check_fields(records, name, cfg)

    def encode(example: dict[str, Any], index: int) -> dict[str, Any]:
        if len(fields) == 1:
            prompt, completion = _split_messages(example[fields[0]], name, fields[0], index)
        else:
            prompt, completion = (_text(example[f], name, f, index) for f in fields)
        return encoder(prompt, completion)

    encoded = records.map(
        encode, with_indices=True, remove_columns=records.column_names, desc=f"tokenizing {name}"
    )
    counts = Counter(encoded["status"])
    if counts[TRUNCATED] or counts[DROPPED]:
        logger.warning(
            "%s: %d of %d examples exceed max_length=%d: %d had their completion cut, %d were dropped "
            "(the prompt alone does not fit)",
            name,
            counts[TRUNCATED] + counts[DROPPED],
            len(encoded),
            cfg.max_length,
            counts[TRUNCATED],
            counts[DROPPED],
        )
    if counts[DROPPED] == len(encoded):
        raise ConfigError(f"{name}: no example fits max_length={cfg.max_length}")
    if counts[DROPPED]:
        encoded = encoded.filter(lambda status: status != DROPPED, input_columns="status")
    return encoded.remove_columns("status")


def _check_fields(records: datasets.Dataset, name: str, cfg: TrainConfig) -> list[str]:
    """``[messages_field]`` for chat records, else ``[prompt_field, completion_field]``, all checked."""
    columns = records.column_names
    if cfg.messages_field in columns:
        if not isinstance(records.features[cfg.messages_field], (list, datasets.List)):
            raise ConfigError(f"{name}: field {cfg.messages_field!r} must be a list of chat messages")
        if not cfg.use_chat_template:
            raise ConfigError(f"{name}: chat records ({cfg.messages_field!r}) need use_chat_template: true")
        return [cfg.messages_field]
    fields = [cfg.prompt_field, cfg.completion_field]
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ConfigError(
            f"{name}: missing field(s) {missing} (and no {cfg.messages_field!r} field); "
            f"found fields {columns}"
        )
    for f in fields:
        feature = records.features[f]
        if not (isinstance(feature, datasets.Value) and feature.dtype in TEXT_TYPES):
            raise ConfigError(f"{name}: field {f!r} must be text, found {feature}")
    return fields


def _text(value: Any, name: str, field: str, index: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: field {field!r} of example {index} is not text: {value!r}")
    return value


def _split_messages(messages: Any, name: str, field: str, index: int) -> tuple[list[dict[str, str]], str]:
    """Chat turns -> (the turns before the last, the last turn's text); the last must be the assistant's."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{name}: field {field!r} of example {index} must be a non-empty list of messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ConfigError(f"{name}: field {field!r} of example {index} has a message without a role")
        _text(message.get("content"), name, f"{field}.content", index)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ConfigError(f"{name}: field {field!r} of example {index} must end with an assistant message")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return turns[:-1], turns[-1]["content"]
