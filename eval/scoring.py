"""Quality scorers, chosen by name: the runner knows no task.

A scorer takes the decoded outputs and the examples (prompt, reference) and returns named figures (rates
in [0, 1] and ``n``), or None when it has nothing to score (e.g. prompts without references). Built in:
``exact`` (exact match against the reference, whitespace-trimmed), ``query`` (the built-in query task:
valid query JSON and exact query match) and ``none``. Any other name is ``module:function`` or
``path/to/file.py:function``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medusa_lora.errors import ConfigError

if TYPE_CHECKING:
    from .examples import EvalExample

Scores = dict[str, float | int]
Scorer = Callable[[Sequence[str], Sequence["EvalExample"]], Scores | None]

BUILTIN = {
    "exact": "medusa_lora.eval.scoring:exact_match",
    "query": "medusa_lora.eval.tasks.query_scorer:score",
}


def exact_match(outputs: Sequence[str], examples: Sequence[EvalExample]) -> Scores | None:
    """Share of outputs equal to their reference (both stripped); None when no example has a reference."""
    pairs = [(o, e.reference) for o, e in zip(outputs, examples, strict=True) if e.reference is not None]
    if not pairs:
        return None
    return {"exact_match": sum(o.strip() == r.strip() for o, r in pairs) / len(pairs), "n": len(pairs)}


def load_scorer(spec: str) -> Scorer | None:
    """The scorer named ``spec`` (see the module docstring); None for ``none``."""
    if spec == "none":
        return None
    target = BUILTIN.get(spec, spec)
    module_name, sep, function = target.rpartition(":")
    if not sep or not module_name or not function:
        raise ConfigError(
            f"unknown scorer {spec!r}: use one of {sorted([*BUILTIN, 'none'])}, module:function or file.py:function"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"scorer file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"_medusa_lora_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import scorer module {module_name!r}: {exc}") from exc
    scorer = getattr(module, function, None)
    if not callable(scorer):
        raise ConfigError(f"scorer {spec!r}: {module_name} has no function {function!r}")
    return scorer
