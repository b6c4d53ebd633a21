"""General-purpose chat instructions unrelated to the task, for self-distilled generic Medusa heads.

A prompt is drawn by picking one of ``TEMPLATES``' kinds uniformly (explain, poem, email, Python, planning,
...), then one of its templates, then each ``{field}`` from ``POOLS`` (``{problem}``: an arithmetic word
problem with drawn numbers), all from a seeded ``random.Random``, so the list is a pure function of the seed.
Each of the 27 kinds gets a 1/27 share on average; no prompt is about logs, telemetry or data queries.
"""

from __future__ import annotations

import random
from pathlib import Path
from string import Formatter

from medusa_lora.errors import ConfigError

from .generic_prompt_pools import (
    BRAINSTORM,
    CLASSIFY,
    CODE_EXPLAIN,
    COMPARISONS,
    CONCEPTS,
    DEFINE_WORDS,
    DESTINATIONS,
    DIALOGUE_FORMS,
    DIALOGUES,
    EMAIL_TASKS,
    GRAMMAR_ERRORS,
    HOWTO,
    JOKE_FORMS,
    JOKE_SUBJECTS,
    JS_TASKS,
    KNOWLEDGE_QUESTIONS,
    LANGUAGES,
    MESSAGE_FORMS,
    MESSAGES,
    OPINION_FORMS,
    OPINIONS,
    PARAGRAPHS,
    POEM_FORMS,
    POEM_SUBJECTS,
    PRODUCT_FORMS,
    PRODUCTS,
    PROS_CONS,
    PYTHON_TASKS,
    RECIPE_CONSTRAINTS,
    RECIPES,
    REVIEWS,
    SCHEDULES,
    SENTENCES,
    STORY_CHARACTERS,
    STORY_EVENTS,
    STORY_LENGTHS,
    STYLES,
    TIP_TOPICS,
    TRAVELLERS,
    TRIVIA,
)
from .splits import SPLITS, GeneratedSplits

FORMAT_VERSION = 1

_NAMES = (
    "Maya",
    "Tom",
    "Priya",
    "Leo",
    "Sara",
    "Jonas",
    "Aiko",
    "Omar",
    "Lena",
    "Ben",
    "Chloe",
    "Diego",
    "Fatima",
    "Hugo",
    "Ines",
    "Kofi",
    "Mia",
    "Noah",
    "Rosa",
    "Yuki",
)


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
    tuple(f"Sort these into {groups}: {items}." for groups, items in CLASSIFY)
    + tuple(f'Is this review positive, negative or neutral? "{review}"' for review in REVIEWS)
    + tuple(f'What is the sentiment of this review, and why? "{review}"' for review in REVIEWS)
)

# Instruction templates by kind; each {field} is drawn from POOLS, {problem} from _math_problem.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "explain": (
        "Explain {concept} in simple terms.",
        "Tell me about {concept} in two or three sentences.",
        "Give a beginner-friendly explanation of {concept}.",
        "Explain {concept} to a ten-year-old.",
        "How would you describe {concept} to someone who has never heard of it?",
    ),
    "compare": (
        "What is the difference between {pair}?",
        "Compare {pair} in a few sentences.",
        "Explain the main similarities and differences between {pair}.",
        "How can I tell the difference between {pair}?",
    ),
    "summarise": (
        "Summarise the following paragraph in one sentence:\n\n{paragraph}",
        "Give the main point of this text in a few words:\n\n{paragraph}",
        "Write a short title and a one-sentence summary for this paragraph:\n\n{paragraph}",
        "Summarise this for a busy reader in two bullet points:\n\n{paragraph}",
        "What are the key facts in this text?\n\n{paragraph}",
    ),
    "poem": ("Write {form} about {subject}.",),
    "email": (
        "Write a short email {email}.",
        "Draft a polite email {email}.",
        "Help me write an email {email}.",
    ),
    "story": ("Write a {length} story about {character} who {event}.",),
    "trivia": (
        "{trivia}",
        "Quick question: {trivia}",
        "Answer briefly: {trivia}",
        "{trivia} Add one interesting fact.",
    ),
    "knowledge": ("{question}", "{question} Explain in a short paragraph.", "{question} Keep it simple."),
    "tips": (
        "Give me {count} tips for {tips}.",
        "What are {count} practical tips for {tips}?",
        "I need advice on {tips}. What should I do?",
        "What are the most common mistakes people make when it comes to {tips}?",
    ),
    "rewrite": ('Rewrite this sentence to sound {style}: "{sentence}"', 'Make this {style}: "{sentence}"'),
    "translate": ('Translate into {language}: "{sentence}"', 'How do you say "{sentence}" in {language}?'),
    "grammar": (
        'Fix the grammar in this sentence: "{mistake}"',
        'Correct this sentence and explain the mistake: "{mistake}"',
        'Is this sentence correct? "{mistake}"',
    ),
    "math": ("Solve this word problem: {problem}", "{problem} Show your working.", "{problem}"),
    "python": (
        "Write a Python function that {py}.",
        "Write a short Python function that {py}, with a docstring.",
        "Show me Python code that {py}, and explain how it works.",
    ),
    "javascript": (
        "Write a JavaScript function that {js}.",
        "Show me a short JavaScript snippet that {js}.",
        "Explain {code_concept} to a beginner programmer.",
    ),
    "brainstorm": (
        "List {count} {brainstorm}.",
        "Brainstorm {count} {brainstorm}.",
        "Give me some {brainstorm}.",
    ),
    "define": (
        'Define "{word}".',
        'What does "{word}" mean? Use it in a sentence.',
        'Give a simple definition of "{word}" and one example.',
    ),
    "pros_cons": (
        "What are the pros and cons of {decision}?",
        "List three advantages and three disadvantages of {decision}.",
        "Should I consider {decision}? Weigh the pros and cons.",
    ),
    "howto": (
        "How do I {howto}?",
        "Give step-by-step instructions to {howto}.",
        "Give me a simple recipe for {recipe}{constraint}.",
        "What do I need to make {recipe}{constraint}, and what are the steps?",
    ),
    "classify": ("{classify}",),
    "message": MESSAGE_FORMS,
    "product": PRODUCT_FORMS,
    "dialogue": DIALOGUE_FORMS,
    "opinion": OPINION_FORMS,
    "planning": (
        "Plan a {days}-day trip to {place}{travellers}.",
        "Suggest an itinerary for {days} days in {place}{travellers}.",
        "Make {schedule}.",
        "Help me create {schedule}.",
    ),
    "analogy": (
        "Give me an everyday analogy that explains {concept}.",
        "Explain {concept} using a comparison with cooking.",
        "Explain {concept} using a sports analogy.",
        "Give me an analogy that helps a child understand {concept}.",
    ),
    "joke": JOKE_FORMS,
}
POOLS: dict[str, tuple[str, ...]] = {
    "concept": CONCEPTS,
    "pair": COMPARISONS,
    "paragraph": PARAGRAPHS,
    "form": POEM_FORMS,
    "subject": POEM_SUBJECTS,
    "email": EMAIL_TASKS,
    "length": STORY_LENGTHS,
    "character": STORY_CHARACTERS,
    "event": STORY_EVENTS,
    "trivia": TRIVIA,
    "question": KNOWLEDGE_QUESTIONS,
    "count": ("3", "5", "7", "10"),
    "tips": TIP_TOPICS,
    "style": STYLES,
    "sentence": SENTENCES,
    "language": LANGUAGES,
    "mistake": GRAMMAR_ERRORS,
    "py": PYTHON_TASKS,
    "js": JS_TASKS,
    "code_concept": CODE_EXPLAIN,
    "brainstorm": BRAINSTORM,
    "word": DEFINE_WORDS,
    "decision": PROS_CONS,
    "howto": HOWTO,
    "recipe": RECIPES,
    "constraint": RECIPE_CONSTRAINTS,
    "classify": _CLASSIFY_TASKS,
    "message": MESSAGES,
    "product": PRODUCTS,
    "dialogue": DIALOGUES,
    "opinion": OPINIONS,
    "days": ("two", "three", "four", "five"),
    "place": DESTINATIONS,
    "travellers": TRAVELLERS,
    "schedule": SCHEDULES,
    "joke": JOKE_SUBJECTS,
}


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
