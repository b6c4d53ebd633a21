"""General-purpose chat instructions unrelated to the task, for self-distilled generic Medusa heads.

A prompt is drawn by picking one of ``TEMPLATES``' kinds uniformly (explain, poem, email, Python, planning,
...), then one of its templates, then each ``{field}`` from ``POOLS`` (``{problem}``: an arithmetic word
problem with drawn numbers), all from a seeded ``random.Random``, so the list is a pure function of the seed.
Each of the 27 kinds gets a 1/27 share on average; no prompt is about logs, telemetry or data queries.
The templates and the word pools are data: ``data/generic_prompt_templates.yaml`` and
``data/generic_prompt_pools.yaml``.
"""

from __future__ import annotations

import random
from pathlib import Path
from string import Formatter

from medusa_lora.errors import ConfigError

from .data_files import load_data
from .splits import SPLITS, GeneratedSplits

FORMAT_VERSION = 1

_POOL_DATA = load_data("generic_prompt_pools.yaml")
_NAMES: tuple[str, ...] = tuple(_POOL_DATA["names"])


def _math_problem(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    a, b, c = rng.randint(10, 40), rng.randint(2, 12), rng.randint(2, 9)
    return rng.choice(
        (
            (
                f"{name} buys {a} apples and gives away {c}. Each remaining apple costs ${b}. "
                "How much did the remaining apples cost in total?"
            ),
            f"A train travels at {a * 5} km/h for {b} hours. How far does it go?",
            f"{name} reads {a} pages a day. How many pages will {name} have read after {b} days?",
            f"A box holds {b} pencils. How many boxes are needed for {a * c} pencils?",
            f"{name} has ${a * 10} and spends ${b * 3} on lunch and ${c * 4} on a book. How much money is left?",
            f"A recipe needs {c} eggs for {b} people. How many eggs are needed for {b * c} people?",
            f"A rectangle is {a} cm long and {b} cm wide. What is its area and its perimeter?",
            f"{name} saves ${b} every week. How many weeks does it take to save ${b * a}?",
            f"A shirt costs ${a * 2} and is on sale for {c * 5}% off. What is the sale price?",
            f"{name} walks {b} km in {c * 15} minutes. What is {name}'s average speed in km/h?",
            f"A class has {a} students and {c} of them are absent. What fraction of the class is present?",
            f"{name} has {a} stickers and buys {b} packs of {c}. How many stickers does {name} have now?",
        )
    )


_CLASSIFY_TASKS = (
    tuple(f"Sort these into {task['into']}: {task['items']}." for task in _POOL_DATA["sort_tasks"])
    + tuple(f'Is this review positive, negative or neutral? "{review}"' for review in _POOL_DATA["reviews"])
    + tuple(f'What is the sentiment of this review, and why? "{review}"' for review in _POOL_DATA["reviews"])
)

# Instruction templates by kind; each {field} is drawn from POOLS, {problem} from _math_problem.
TEMPLATES: dict[str, tuple[str, ...]] = {
    kind: tuple(templates) for kind, templates in load_data("generic_prompt_templates.yaml").items()
}
# Word pools by {field}; names, reviews and sort_tasks are not fields but what the prompts above are made of.
POOLS: dict[str, tuple[str, ...]] = {
    field: tuple(words)
    for field, words in _POOL_DATA.items()
    if field not in ("names", "reviews", "sort_tasks")
} | {"classify": _CLASSIFY_TASKS}


def _fill(template: str, rng: random.Random) -> str:
    fields = sorted({name for _, name, _, _ in Formatter().parse(template) if name})
    values = {f: _math_problem(rng) if f == "problem" else rng.choice(POOLS[f]) for f in fields}
    return template.format(**values)


def draw_generic_prompts(seed: int = 0, n: int = 300) -> list[tuple[str, str]]:
    """``n`` distinct ``(kind, prompt)`` pairs, the kind drawn uniformly, deterministic from ``seed``.

    The first ``k`` pairs do not depend on ``n``. Raises ``ConfigError`` if ``n`` distinct prompts cannot be drawn.
    """
    rng = random.Random(seed)
    kinds = sorted(TEMPLATES)
    drawn: dict[str, str] = {}
    for _ in range(n * 50):
        if len(drawn) >= n:
            break
        kind = rng.choice(kinds)
        drawn.setdefault(_fill(rng.choice(TEMPLATES[kind]), rng), kind)
    if len(drawn) < n:
        raise ConfigError(f"could not draw {n} distinct generic prompts (got {len(drawn)})")
    return [(kind, prompt) for prompt, kind in drawn.items()]


def make_generic_prompts(seed: int = 0, n: int = 300) -> list[str]:
    """``n`` distinct general instructions (none about the query task), deterministic from ``seed``."""
    return [prompt for _, prompt in draw_generic_prompts(seed, n)]


def make_generic_splits(
    seed: int = 0, n_train: int = 1200, n_validation: int = 100, n_test: int = 100
) -> dict[str, list[dict[str, str]]]:
    """Disjoint ``{"id", "prompt"}`` records; train is ``make_generic_prompts(seed, n_train)``.

    So ``generic:N`` prompts (N <= n_train, same seed) never overlap validation or test.
    """
    prompts = make_generic_prompts(seed, n_train + n_validation + n_test)
    bounds = (0, n_train, n_train + n_validation, len(prompts))
    return {
        split: [{"id": f"generic-{split}-{i:05d}", "prompt": p} for i, p in enumerate(prompts[lo:hi])]
        for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }


GENERIC_PROMPTS = GeneratedSplits(
    make_generic_splits,
    {"kind": "generic-prompts", "format_version": FORMAT_VERSION},
    (1200, 100, 100),
    "medusa-lora make-generic-prompts",
    "write general prompts (train/validation/test, prompts only) for generic heads and off-task eval",
    Path("data/generic"),
)
write_generic_prompts = GENERIC_PROMPTS.write  # prompts-only splits, reused if made with the same parameters
main = GENERIC_PROMPTS.main
