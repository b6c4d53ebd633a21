"""Datasets as users hand them over: a local jsonl/json/parquet/csv file or a hub dataset, holding
``prompt``/``completion`` records or chat ``messages`` (the last assistant turn is the answer).

Training and the eval read records through here, so both accept the same data and report a bad record
the same way: the dataset, the record's index and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from medusa_lora.errors import ConfigError
from medusa_lora.prompting import Prompt

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_TYPES = ("string", "large_string")


@dataclass(frozen=True)
class RecordFields:
    """Field names: a chat ``messages`` list, or a ``prompt`` and its ``completion``."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


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


def load_hub_records(name: str, config: str | None, split: str) -> datasets.Dataset:
    """A split of a hub dataset (or a local dataset script/dir ``datasets`` can load)."""
    try:
        records = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # hub, network and split errors
        raise ConfigError(f"cannot load dataset {name}[{split}]: {exc}") from exc
    if len(records) == 0:
        raise ConfigError(f"{name}[{split}] is empty: it holds no examples")
    return records


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's examples are: chat ``messages``, or a ``prompt`` and (if present) a ``completion``."""

    messages: str | None = None
    prompt: str | None = None
    completion: str | None = None


def record_layout(
    records: datasets.Dataset,
    name: str,
    fields: RecordFields = RecordFields(),
    use_chat_template: bool = True,
    need_answers: bool = True,
) -> DatasetLayout:
    """Which fields hold the examples, checked before anything else reads the data. Prompts alone (no
    completion field) are allowed when answers are not needed."""
    columns = records.column_names
    if fields.messages in columns:
        if not isinstance(records.features[fields.messages], (list, datasets.List)):
            raise ConfigError(f"{name}: field {fields.messages!r} must be a list of chat messages")
        if not use_chat_template:
            raise ConfigError(f"{name}: chat records ({fields.messages!r}) need the chat template")
        return DatasetLayout(messages=fields.messages)
    wanted = [fields.prompt, fields.completion]
    if not need_answers and fields.completion not in columns:
        wanted = [fields.prompt]
    missing = [f for f in wanted if f not in columns]
    if missing:
        raise ConfigError(
            f"{name}: missing field(s) {missing} (and no {fields.messages!r} field); found fields {columns}"
        )
    for f in wanted:
        feature = records.features[f]
        if not (isinstance(feature, datasets.Value) and feature.dtype in TEXT_TYPES):
            raise ConfigError(f"{name}: field {f!r} must be text, found {feature}")
    return DatasetLayout(prompt=fields.prompt, completion=wanted[1] if len(wanted) > 1 else None)


def split_record(
    record: dict[str, Any], layout: DatasetLayout, name: str, index: int, need_answers: bool = True
) -> tuple[Prompt, str | None]:
    """(the prompt, the reference answer or None) of one record."""
    if layout.messages is not None:
        return _split_messages(record[layout.messages], name, layout.messages, index, need_answers)
    assert layout.prompt is not None
    prompt = _text(record[layout.prompt], name, layout.prompt, index)
    if not prompt:
        raise ConfigError(f"{name}: field {layout.prompt!r} of record {index} is empty")
    if layout.completion is None:
        return prompt, None
    return prompt, _text(record[layout.completion], name, layout.completion, index)


def _text(value: Any, name: str, field: str, index: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: field {field!r} of record {index} is not text: {value!r}")
    return value


def _split_messages(
    messages: Any, name: str, field: str, index: int, need_answers: bool
) -> tuple[list[dict[str, str]], str | None]:
    """Chat turns -> (the turns before the last assistant turn, its text); without answers needed, turns
    that end with a user turn are a prompt alone."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{name}: field {field!r} of record {index} must be a non-empty list of messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ConfigError(f"{name}: field {field!r} of record {index} has a message without a role")
        _text(message.get("content"), name, f"{field}.content", index)
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if turns[-1]["role"] == "assistant" and len(turns) >= 2:
        return turns[:-1], turns[-1]["content"]
    if need_answers:
        raise ConfigError(f"{name}: field {field!r} of record {index} must end with an assistant message")
    if turns[-1]["role"] == "assistant":
        raise ConfigError(f"{name}: field {field!r} of record {index} has no turn before the assistant's")
    return turns, None
