"""Eval prompts from any dataset ``medusa-lora train`` accepts (same loaders, formats and tokenisation),
prompts-only files included."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medusa_lora.prompting import Prompt, PromptFormat
from medusa_lora.records import (
    BUILDERS,
    RecordFields,
    load_hub_records,
    read_records,
    record_layout,
    split_record,
)


@dataclass(frozen=True)
class EvalExample:
    """A test prompt as token ids (formatted as in training), its reference answer if any, and the prompt."""

    id: str
    prompt_ids: list[int]
    reference: str | None = None
    prompt: Prompt | None = None


@dataclass(frozen=True)
class DataSpec:
    """A local file, or a hub dataset's split, and its field names."""

    source: str
    split: str | None = None  # hub datasets only
    config: str | None = None
    fields: RecordFields = field(default_factory=RecordFields)
    id_field: str = "id"


def load_examples(
    spec: DataSpec, prompt_format: PromptFormat, limit: int | None = None, offset: int = 0
) -> list[EvalExample]:
    """Records ``offset .. offset + limit`` of ``spec``; each record's fields are checked, the prompt
    tokenised with ``prompt_format`` (the chat template as in training)."""
    if spec.split is None and (Path(spec.source).suffix.lower() in BUILDERS or Path(spec.source).exists()):
        records, name = read_records(spec.source), spec.source
    else:
        split = spec.split or "test"
        records, name = load_hub_records(spec.source, spec.config, split), f"{spec.source}[{split}]"
    layout = record_layout(records, name, spec.fields, prompt_format.use_chat_template, need_answers=False)
    stop = len(records) if limit is None else min(len(records), offset + limit)
    examples = []
    for index in range(offset, stop):
        record = records[index]
        prompt, reference = split_record(record, layout, name, index, need_answers=False)
        record_id = record.get(spec.id_field)
        examples.append(
            EvalExample(
                id=str(record_id) if record_id is not None else f"{Path(name).stem}-{index}",
                prompt_ids=prompt_format.encode(prompt),
                reference=reference,
                prompt=prompt,
            )
        )
    return examples
