"""The built-in query task's scorer (``--scorer query``): valid query JSON against the prompt's columns,
and exact query match against the reference."""

from __future__ import annotations

from collections.abc import Sequence

from medusa_lora.errors import ConfigError

from ..examples import EvalExample
from .query_data import columns_from_prompt
from .query_schema import score_outputs


def score(outputs: Sequence[str], examples: Sequence[EvalExample]) -> dict[str, float | int] | None:
    """None without references; a prompt without the task's column block is an error naming it."""
    if not examples or any(e.reference is None for e in examples):
        return None
    columns = []
    for example in examples:
        text = example.prompt if isinstance(example.prompt, str) else example.prompt[-1]["content"]
        if "\n\nColumns:\n" not in text:
            raise ConfigError(
                f"--scorer query: prompt {example.id!r} has no 'Columns:' block of the query task"
            )
        columns.append(columns_from_prompt(text))
    return score_outputs(outputs, [e.reference for e in examples], columns)
