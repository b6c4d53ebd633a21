"""Training data: local files or a hub dataset, prompt/completion or chat records, tokenized with labels.

The prompt is tokenized exactly as ``generate()`` sees it at inference: the chat template applied to
the user turn with ``add_generation_prompt=True`` (or the raw prompt text), without added special
tokens. The completion follows, closed by the template's end-of-turn token; only completion tokens
carry labels.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch.utils.data import Sampler
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from medusa_lora.errors import ConfigError
from medusa_lora.model.heads import IGNORE_INDEX
from medusa_lora.prompting import Prompt, PromptFormat
from medusa_lora.records import (
    DatasetLayout,
    RecordFields,
    load_hub_records,
    read_records,
    record_layout,
    split_record,
)
from medusa_lora.training.config import TrainConfig

logger = logging.getLogger(__name__)

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
    encoder = Encoder(PromptFormat(tokenizer, cfg.use_chat_template), cfg.max_length)
    train, train_name = _read(cfg, cfg.train_file, cfg.train_split)
    _layout(train, train_name, cfg)  # a missing or mistyped field is the first thing reported
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.validation_file is not None or cfg.validation_split is not None:
        validation, validation_name = _read(cfg, cfg.validation_file, cfg.validation_split)
        _layout(validation, validation_name, cfg)
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


def _read(cfg: TrainConfig, path: str | None, split: str | None) -> tuple[datasets.Dataset, str]:
    if path is not None:
        return read_records(path), str(path)
    return load_hub_records(cfg.dataset, cfg.dataset_config, split), f"{cfg.dataset}[{split}]"


class Encoder:
    """(prompt or chat turns, completion) -> ``input_ids`` and ``labels`` of at most ``max_length``."""

    def __init__(self, prompt_format: PromptFormat, max_length: int) -> None:
        self.prompt_format = prompt_format
        self.max_length = max_length

    def __call__(self, prompt: Prompt, completion: str) -> dict[str, Any]:
        prompt_ids = self.prompt_format.encode(prompt)
        completion_ids = self.prompt_format.encode_answer(completion)
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


def tokenize(records: datasets.Dataset, name: str, cfg: TrainConfig, encoder: Encoder) -> datasets.Dataset:
    """Check the fields, tokenize, report and drop what does not fit ``max_length``."""
    layout = _layout(records, name, cfg)

    def encode(example: dict[str, Any], index: int) -> dict[str, Any]:
        prompt, completion = split_record(example, layout, name, index)
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


def _layout(records: datasets.Dataset, name: str, cfg: TrainConfig) -> DatasetLayout:
    fields = RecordFields(cfg.prompt_field, cfg.completion_field, cfg.messages_field)
    return record_layout(records, name, fields, cfg.use_chat_template)


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of examples of similar lengths, so that little of each batch is padding: transformers' length
    grouping (a random permutation, sorted by length within mega-batches of up to 50 batches), then the
    batches in a random order, so that long and short ones alternate over training instead of sweeping from
    long to short in each mega-batch. The order is fixed by ``seed`` (a resumed run sees the same batches)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.drop_last = False  # read by accelerate when it shards batches over processes

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)
