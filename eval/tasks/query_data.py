"""Built-in demonstration task: observability questions over a column schema -> compact JSON query.

Every example is drawn from a ``random.Random`` seeded by the caller, so the data is a pure function
of the seed. A schema is a random subset of a domain's columns; the question is assembled from
wording templates and phrase pools, and the target query is built alongside it, so the two agree. The
column catalogue and the phrase pools are data: ``data/query_catalogue.yaml`` and ``data/query_phrases.yaml``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .data_files import load_data
from .query_schema import dump_query
from .splits import SPLITS, GeneratedSplits

DEFAULT_TIME_RANGE = "2h"
FORMAT_VERSION = 3  # 2: schemas of 6-12 columns (were 8-25); 3: time ranges as durations ("5d", were seconds)
MIN_COMPLETION_CHARS, MAX_COMPLETION_CHARS = 90, 340  # about 30-120 SmolLM2 tokens
MIN_COLUMNS, MAX_COLUMNS = 6, 12  # the columns an assistant is shown: a dataset's relevant ones
INSTRUCTION = (
    "Write a query that answers the question about this observability dataset. Reply with compact JSON "
    "only, using only the columns listed below. If the question gives no time range, use 2h."
)


@dataclass(frozen=True)
class Column:
    """A catalogue column and what is needed to talk about it."""

    name: str
    types: tuple[str, ...]  # possible types; repeats weight the draw
    nouns: tuple[str, ...]  # how people refer to it; nouns are unique across the catalogue
    values: tuple[Any, ...] = ()  # typical values for equality filters
    thresholds: tuple[float, ...] = ()  # numeric cut-offs; a column with thresholds is a measure
    fmt: str = "{v}"  # how a threshold is written in prose, e.g. "{v}ms"
    dim: bool = False  # sensible to break down by
    distinct: bool = False  # sensible to count distinct values of
    additive: bool = False  # SUM is meaningful
    latency: bool = False  # "slowest" / "fastest" apply
    prefixes: tuple[str, ...] = ()
    substrings: tuple[str, ...] = ()
    yes: tuple[str, ...] = ()  # post-modifiers meaning "= true" (booleans)
    no: tuple[str, ...] = ()  # post-modifiers meaning "= false"


# YAML reads bare yes/no keys as booleans, so the catalogue spells Column.yes/no as if_true/if_false.
_RECORD_FIELDS = {"if_true": "yes", "if_false": "no"}


def _column(record: dict[str, Any]) -> Column:
    """A column record of ``data/query_catalogue.yaml`` as a Column (its lists as tuples)."""
    fields = {_RECORD_FIELDS.get(k, k): tuple(v) if isinstance(v, list) else v for k, v in record.items()}
    return Column(**fields)


@dataclass(frozen=True)
class Domain:
    """A kind of service: its own columns, entity words and values for the common columns."""

    name: str
    entities: tuple[str, ...]
    columns: tuple[Column, ...]
    overrides: dict[str, dict[str, tuple[Any, ...]]]


def _routes(*routes: str) -> dict[str, tuple[str, ...]]:
    return {"values": routes, "prefixes": tuple(sorted({"/" + r.split("/")[1] for r in routes}))}


def _domain(record: dict[str, Any]) -> Domain:
    """A domain record: its columns, and its values for service.name and http.route."""
    overrides = {
        "service.name": {"values": tuple(record["services"])},
        "http.route": _routes(*record["routes"]),
    }
    columns = tuple(_column(c) for c in record["columns"])
    return Domain(record["name"], tuple(record["entities"]), columns, overrides)


_CATALOGUE = load_data("query_catalogue.yaml")
COMMON_COLUMNS = tuple(_column(c) for c in _CATALOGUE["common_columns"])
DOMAINS = tuple(_domain(d) for d in _CATALOGUE["domains"])

_PHRASES = load_data("query_phrases.yaml")
# Post-modifiers for particular (column, op) pairs; {v} is the value, {secs} a whole number of seconds.
_POST_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    (column, op): tuple(phrases)
    for column, by_op in _PHRASES["post_phrases"].items()
    for op, phrases in by_op.items()
}
_VERBAL_PREDICATES = {op: tuple(t) for op, t in _PHRASES["verbal_predicates"].items()}
_SYMBOLIC_PREDICATES: dict[str, str] = _PHRASES["symbolic_predicates"]
_FIVE_XX = tuple(_PHRASES["five_xx"])
_CALC_PHRASES = {op: tuple(t) for op, t in _PHRASES["calc_phrases"].items()}
_TIME_UNITS = tuple(  # (unit, abbreviation, typical counts)
    (u["unit"], u["abbreviation"], tuple(u["counts"])) for u in _PHRASES["time_units"]
)
_TIME_LEADS = tuple(_PHRASES["time_leads"])
_NAMED_TIMES = tuple(_PHRASES["named_times"].items())  # (phrase, duration)

_MEASURE_OPS = ("AVG", "P50", "P90", "P95", "P99", "MIN", "MAX", "SUM", "HEATMAP")
_MEASURE_WEIGHTS = (3, 1, 1, 2, 2, 1, 0.6, 1.5, 1)
_NUMBER_WORDS = {3: "three", 5: "five", 10: "ten"}


@dataclass(frozen=True)
class Example:
    """One generated question with its schema, target query and the wording template used."""

    question: str
    columns: tuple[tuple[str, str], ...]
    query: dict[str, Any]
    template: str
    domain: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.question, list(self.columns))

    @property
    def completion(self) -> str:
        return dump_query(self.query)


@dataclass
class _Clause:
    text: str
    flt: dict[str, Any]
    post: bool  # a post-modifier ("for the x service") rather than a "where" predicate


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


class _Builder:
    """Draws the parts of one question over a sampled schema."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.domain = rng.choice(DOMAINS)
        self.columns, self.types = self._sample_schema()

    def _sample_schema(self) -> tuple[list[Column], dict[str, str]]:
        rng, domain = self.rng, self.domain
        pool = [replace(c, **domain.overrides.get(c.name, {})) for c in COMMON_COLUMNS + domain.columns]
        if rng.random() < 0.25:
            other = rng.choice([d for d in DOMAINS if d is not domain])
            pool += rng.sample(other.columns, rng.randint(1, 3))
        required, rest = pool[:2], pool[2:]  # service.name and duration_ms are in every dataset
        size = rng.randint(MIN_COLUMNS, min(MAX_COLUMNS, len(pool)))
        columns = required + rng.sample(rest, size - len(required))
        return columns, {c.name: rng.choice(c.types) for c in columns}

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.types.items()))

    def numeric(self, col: Column) -> bool:
        return self.types[col.name] in ("integer", "float")

    def measures(self) -> list[Column]:
        return [c for c in self.columns if c.thresholds and self.numeric(c)]

    def dims(self, exclude: tuple[str, ...] = ()) -> list[Column]:
        return [c for c in self.columns if c.dim and c.name not in exclude]

    def noun(self, col: Column) -> str:
        return col.name if self.rng.random() < 0.2 else self.rng.choice(col.nouns)

    def plural(self, col: Column) -> str:
        return f"{col.name} values" if self.rng.random() < 0.15 else _plural(self.rng.choice(col.nouns))

    def entity(self) -> str:
        return self.rng.choice(self.domain.entities)

    def number(self, k: int) -> str:
        return _NUMBER_WORDS[k] if k in _NUMBER_WORDS and self.rng.random() < 0.3 else str(k)

    # --- calculations -------------------------------------------------------------------------------------
    def calc(self, op: str, col: Column | None) -> tuple[str, dict[str, Any]]:
        phrase = self.rng.choice(_CALC_PHRASES[op])
        if col is None:
            return phrase.format(e=self.entity()), {"op": "COUNT"}
        text = phrase.format(n=self.noun(col), p=self.plural(col))
        return text, {"op": op, "column": col.name}

    def measure_calc(self, col: Column | None = None) -> tuple[str, dict[str, Any]]:
        col = col or self.rng.choice(self.measures())
        weighted = zip(_MEASURE_OPS, _MEASURE_WEIGHTS, strict=True)
        ops = [(op, w) for op, w in weighted if op != "SUM" or col.additive]
        op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        return self.calc(op, col)

    def any_calc(self) -> tuple[str, dict[str, Any]]:
        distinct = [c for c in self.columns if c.distinct]
        r = self.rng.random()
        if r < 0.2:
            return self.calc("COUNT", None)
        if r < 0.3 and distinct:
            return self.calc("COUNT_DISTINCT", self.rng.choice(distinct))
        return self.measure_calc()

    # --- filters ------------------------------------------------------------------------------------------
    def _value_text(self, col: Column, value: Any, op: str) -> str:
        if isinstance(value, list):
            return ", ".join(str(v) for v in value)
        if isinstance(value, str) and (op in ("contains", "starts-with") or self.rng.random() < 0.15):
            return f"'{value}'"
        if op in (">", ">=", "<", "<=") and self.rng.random() < 0.8:
            return col.fmt.format(v=value)
        return str(value)

    def _ops(self, col: Column) -> list[tuple[str, float]]:
        if self.types[col.name] == "boolean":
            return [("=", 1)]
        ops: list[tuple[str, float]] = [("exists", 0.3), ("does-not-exist", 0.3)]
        if col.values:
            ops += [("=", 5), ("!=", 1.2), ("in", 1)]
        if col.thresholds and self.numeric(col):
            ops += [(">", 4), (">=", 1.5), ("<", 2), ("<=", 1)]
        if self.types[col.name] == "string":
            ops += [("contains", 1.5)] if col.substrings else []
            ops += [("starts-with", 1.5)] if col.prefixes else []
        return ops

    def _typed(self, col: Column, value: Any) -> Any:
        return str(value) if self.types[col.name] == "string" else value

    def clause(self, col: Column, predicate_only: bool = False) -> _Clause:
        """A filter on ``col`` and its wording; ``predicate_only`` forces "<column> <op> <value>" wording."""
        rng, name = self.rng, col.name
        if name == "http.status_code" and rng.random() < 0.2 and not predicate_only:
            five_xx = ("starts-with", "5") if self.types[name] == "string" else (">=", 500)
            flt = {"column": name, "op": five_xx[0], "value": five_xx[1]}
            return _Clause(rng.choice(_FIVE_XX), flt, True)
        ops = self._ops(col)
        op = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        value: Any = None
        if self.types[name] == "boolean":
            value = rng.random() < 0.7
        elif op in ("=", "!="):
            value = self._typed(col, rng.choice(col.values))
        elif op == "in":
            picked = rng.sample(col.values, min(len(col.values), rng.randint(2, 3)))
            value = [self._typed(col, v) for v in picked]
        elif op in (">", ">=", "<", "<="):
            value = rng.choice(col.thresholds)
        elif op == "contains":
            value = rng.choice(col.substrings)
        elif op == "starts-with":
            value = rng.choice(col.prefixes)
        flt = {"column": name, "op": op} | ({} if value is None else {"value": value})
        if predicate_only or rng.random() < 0.35:
            return _Clause(self._predicate(col, op, value), flt, False)
        if isinstance(value, bool):
            return _Clause(rng.choice(col.yes if value else col.no), flt, True)
        posts = [
            p
            for p in _POST_PHRASES.get((name, op), ())
            if "{secs}" not in p or (isinstance(value, int) and value >= 1000 and value % 1000 == 0)
        ]
        if posts:
            secs = f"{value // 1000} second{'s' if value != 1000 else ''}" if isinstance(value, int) else ""
            return _Clause(rng.choice(posts).format(v=value, secs=secs), flt, True)
        return _Clause(self._predicate(col, op, value), flt, False)

    def _predicate(self, col: Column, op: str, value: Any) -> str:
        text = "" if value is None else self._value_text(col, value, op)
        if isinstance(value, bool):
            text = str(value).lower()
        if self.rng.random() < 0.3:
            template = _SYMBOLIC_PREDICATES.get(op, "{n} " + op + " {v}")
            return template.format(n=col.name, v=text)
        return self.rng.choice(_VERBAL_PREDICATES[op]).format(n=self.noun(col), v=text)

    def filters(self, n: int, predicate_only: bool = False) -> list[_Clause]:
        """Filters on ``n`` different columns, post-modifiers first (the order they are worded in).

        Columns that only support exists/does-not-exist are drawn less often.
        """
        candidates = list(self.columns)
        chosen: list[Column] = []
        while len(chosen) < n and candidates:
            weights = [
                1.0 if c.values or c.thresholds or c.yes or c.prefixes or c.substrings else 0.2
                for c in candidates
            ]
            chosen.append(candidates.pop(self.rng.choices(range(len(candidates)), weights)[0]))
        return sorted((self.clause(c, predicate_only) for c in chosen), key=lambda c: not c.post)

    def filter_text(self, clauses: list[_Clause], combination: str = "AND") -> str:
        if combination == "OR":
            a, b = (c.text for c in clauses)
            return " " + self.rng.choice(
                ("where either {} or {}", "where {} or {}", "matching {} or {}", "that match either {} or {}")
            ).format(a, b)
        posts = [c.text for c in clauses if c.post]
        preds = [c.text for c in clauses if not c.post]
        text = "".join(" " + p for p in posts)
        if preds:
            text += " " + self.rng.choice(("where", "when", "if")) + " " + " and ".join(preds)
        return text

    # --- breakdowns and time ------------------------------------------------------------------------------
    def group_text(self, cols: list[Column]) -> str:
        if not cols:
            return ""
        lead = self.rng.choice(("by", "per", "broken down by", "grouped by", "for each", "split by"))
        return f" {lead} " + " and ".join(self.noun(c) for c in cols)

    def time(self) -> tuple[str, str]:
        """The question's time phrase and its duration, the count and unit as the question says them."""
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            return "", DEFAULT_TIME_RANGE
        if r < 0.4:
            return rng.choice(_NAMED_TIMES)
        unit, short, counts = rng.choice(_TIME_UNITS)
        n = rng.choice(counts)
        if rng.random() < 0.15:
            return f"{rng.choice(('in the last', 'last'))} {n}{short}", f"{n}{short}"
        amount = unit if n == 1 else f"{n} {unit}s"
        return f"{rng.choice(_TIME_LEADS)} {amount}", f"{n}{short}"


def _filters_and_groups(b: _Builder, max_groups: int = 2) -> tuple[list[_Clause], list[Column]]:
    """0-2 filters and 0-``max_groups`` breakdowns, at least one of either."""
    rng = b.rng
    n_filters = rng.choices((0, 1, 2), (3, 5, 2))[0]
    clauses = b.filters(n_filters)
    used = tuple(c.flt["column"] for c in clauses)
    dims = b.dims(exclude=used)
    n_groups = min(len(dims), rng.choices((0, 1, 2), (4, 5, 1))[0] if max_groups > 1 else rng.randint(0, 1))
    if not clauses and not n_groups:
        n_groups = min(1, len(dims))
    return clauses, rng.sample(dims, n_groups)


def _sort_suffix(b: _Builder, calc: dict[str, Any], groups: list[Column]) -> tuple[str, list[dict[str, Any]]]:
    """Optional ordering of a broken-down result, by the calculation or by the breakdown column."""
    rng = b.rng
    if not groups or calc["op"] == "HEATMAP" or rng.random() < 0.7:
        return "", []
    if rng.random() < 0.25:
        col = groups[0]
        return f", sorted by {b.noun(col)}", [{"column": col.name, "order": "ascending"}]
    descending = rng.random() < 0.7
    phrases = (
        (", highest first", ", sorted descending", ", ordered from highest to lowest")
        if descending
        else (", lowest first", ", sorted ascending", ", ordered from lowest to highest")
    )
    return rng.choice(phrases), [calc | {"order": "descending" if descending else "ascending"}]


_Frame = Callable[[_Builder], tuple[str, int, dict[str, Any]] | None]
_FRAMES: dict[str, _Frame] = {}


def _frame(fn: _Frame) -> _Frame:
    _FRAMES[fn.__name__.lstrip("_")] = fn
    return fn


def _pick(b: _Builder, variants: tuple[str, ...]) -> tuple[int, str]:
    i = b.rng.randrange(len(variants))
    return i, variants[i]


def _query(
    calcs: list[dict[str, Any]],
    clauses: list[_Clause],
    groups: list[Column],
    time_range: str,
    orders: Sequence[dict[str, Any]] = (),
    limit: int | None = None,
    combination: str = "AND",
) -> dict[str, Any]:
    """The target query; empty parts are left out."""
    query = {
        "calculations": calcs,
        "filters": [c.flt for c in clauses],
        "filter_combination": "OR" if combination == "OR" else None,
        "breakdowns": [c.name for c in groups],
        "orders": list(orders),
        "time_range": time_range,
        "limit": limit,
    }
    return {key: value for key, value in query.items() if value not in (None, [])}


_AGGREGATE = (
    "show me the {calc}{of}{filters}{group}{time}",
    "what's the {calc}{of}{filters}{group}{time}?",
    "what is the {calc}{of}{filters}{group}{time}?",
    "give me the {calc}{of}{filters}{group}{time}",
    "graph the {calc}{of}{filters}{group}{time}",
    "{calc}{of}{filters}{group}{time}",
    "can you plot the {calc}{of}{filters}{group}{time}?",
    "I'd like to see the {calc}{of}{filters}{group}{time}",
    "what was the {calc}{of}{filters}{group}{time}?",
    "how does the {calc}{of}{filters} look{group}{time}?",
)


@_frame
def _aggregate(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    text, calc = b.any_calc()
    clauses, groups = _filters_and_groups(b)
    phrase, duration = b.time()
    suffix, orders = _sort_suffix(b, calc, groups)
    counted = calc["op"] in ("COUNT", "COUNT_DISTINCT")  # their wording already names what is counted
    of = "" if counted else b.rng.choice(("", "", f" of {b.entity()}", f" for {b.entity()}"))
    i, variant = _pick(b, _AGGREGATE)
    question = _render(
        b,
        variant,
        phrase,
        suffix,
        calc=text,
        of=of,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([calc], clauses, groups, duration, orders)


_COUNT = (
    "how many {entity}{filters}{group}{time}?",
    "how many {entity} were there{filters}{group}{time}?",
    "count {entity}{filters}{group}{time}",
    "count the {entity}{filters}{group}{time}",
    "number of {entity}{filters}{group}{time}",
    "show me the number of {entity}{filters}{group}{time}",
    "give me a count of {entity}{filters}{group}{time}",
    "total {entity}{filters}{group}{time}",
    "how many {entity} did we get{filters}{group}{time}?",
)


@_frame
def _count(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    clauses, groups = _filters_and_groups(b)
    phrase, duration = b.time()
    calc = {"op": "COUNT"}
    suffix, orders = _sort_suffix(b, calc, groups)
    i, variant = _pick(b, _COUNT)
    question = _render(
        b,
        variant,
        phrase,
        suffix,
        entity=b.entity(),
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([calc], clauses, groups, duration, orders)


_DISTINCT = (
    "how many unique {plural}{filters}{group}{time}?",
    "how many distinct {plural}{filters}{group}{time}?",
    "count distinct {name}{filters}{group}{time}",
    "number of unique {plural}{filters}{group}{time}",
    "what's the number of distinct {plural}{filters}{group}{time}?",
    "how many different {plural} were seen{filters}{group}{time}?",
)


@_frame
def _count_distinct(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    distinct = [c for c in b.columns if c.distinct]
    if not distinct:
        return None
    col = b.rng.choice(distinct)
    clauses, groups = _filters_and_groups(b, max_groups=1)
    groups = [g for g in groups if g is not col]
    phrase, duration = b.time()
    i, variant = _pick(b, _DISTINCT)
    question = _render(
        b,
        variant,
        phrase,
        "",
        plural=b.plural(col),
        name=col.name,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([{"op": "COUNT_DISTINCT", "column": col.name}], clauses, groups, duration)


# (wording, needs) where needs is "calc", "count" or "latency"; {k} is the limit, {dims}/{dim} the breakdown.
_TOP_DESC = (
    ("top {k} {dims} by {calc}{filters}{time}", "calc"),
    ("which {k} {dims} have the highest {calc}{filters}{time}?", "calc"),
    ("show the {k} {dims} with the highest {calc}{filters}{time}", "calc"),
    ("what are the top {k} {dims} by {calc}{filters}{time}?", "calc"),
    ("which {dim} has the highest {calc}{filters}{time}?", "calc"),
    ("list the {k} {dims} with the most {entity}{filters}{time}", "count"),
    ("which {k} {dims} get the most {entity}{filters}{time}?", "count"),
    ("what are the {k} most common {dims}{filters}{time}?", "count"),
    ("which {k} {dims} are the slowest by {calc}{filters}{time}?", "latency"),
    ("which {dim} is the slowest by {calc}{filters}{time}?", "latency"),
)
_TOP_ASC = (
    ("bottom {k} {dims} by {calc}{filters}{time}", "calc"),
    ("which {k} {dims} have the lowest {calc}{filters}{time}?", "calc"),
    ("which {dim} has the lowest {calc}{filters}{time}?", "calc"),
    ("show the {k} {dims} with the fewest {entity}{filters}{time}", "count"),
    ("which {k} {dims} are the fastest by {calc}{filters}{time}?", "latency"),
)


@_frame
def _top_n(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    rng = b.rng
    descending = rng.random() < 0.75
    variants = _TOP_DESC if descending else _TOP_ASC
    i, (variant, needs) = _pick(b, variants)
    clauses = b.filters(rng.choices((0, 1, 2), (3, 5, 1))[0])
    dims = b.dims(exclude=tuple(c.flt["column"] for c in clauses))
    latency = [c for c in b.measures() if c.latency]
    if not dims or (needs == "latency" and not latency):
        return None
    dim = rng.choice(dims)
    if needs == "count":
        text, calc = b.calc("COUNT", None)
    elif needs == "latency":
        op = rng.choice(("AVG", "P50", "P90", "P95", "P99", "MAX"))
        text, calc = b.calc(op, rng.choice(latency))
    else:
        text, calc = b.measure_calc() if rng.random() < 0.8 else b.calc("COUNT", None)
        if calc["op"] == "HEATMAP":
            return None
    k = 1 if "{dim}" in variant else rng.choice((3, 5, 5, 10, 10, 20))
    phrase, duration = b.time()
    question = _render(
        b,
        variant,
        phrase,
        "",
        k=b.number(k),
        dims=b.plural(dim),
        dim=b.noun(dim),
        calc=text,
        entity=b.entity(),
        filters=b.filter_text(clauses),
    )
    order = calc | {"order": "descending" if descending else "ascending"}
    offset = 0 if descending else len(_TOP_DESC)
    return question, offset + i, _query([calc], clauses, [dim], duration, [order], k)


_MULTI = (
    "show {c1} and {c2}{of}{filters}{group}{time}",
    "compare {c1} and {c2}{of}{filters}{group}{time}",
    "what are the {c1} and the {c2}{of}{filters}{group}{time}?",
    "give me {c1} alongside {c2}{of}{filters}{group}{time}",
    "{c1} and {c2}{of}{filters}{group}{time}",
    "I want both the {c1} and the {c2}{of}{filters}{group}{time}",
)


@_frame
def _multi_calc(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    rng = b.rng
    col = rng.choice(b.measures())
    pair = rng.choice((("AVG", "P99"), ("P50", "P95"), ("MIN", "MAX"), ("AVG", "MAX"), ("P50", "P99"), None))
    if pair is None:
        first, second = b.calc("COUNT", None), b.measure_calc(col)
        if second[1]["op"] == "HEATMAP":
            return None
    else:
        first, second = b.calc(pair[0], col), b.calc(pair[1], col)
    clauses, groups = _filters_and_groups(b)
    phrase, duration = b.time()
    of = rng.choice(("", "", f" for {b.entity()}"))
    i, variant = _pick(b, _MULTI)
    question = _render(
        b,
        variant,
        phrase,
        "",
        c1=first[0],
        c2=second[0],
        of=of,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([first[1], second[1]], clauses, groups, duration)


_HEATMAP = (
    "show a heatmap of {n}{of}{filters}{group}{time}",
    "heatmap {n}{of}{filters}{group}{time}",
    "visualize the distribution of {n}{of}{filters}{group}{time}",
    "plot {n} as a heatmap{of}{filters}{group}{time}",
    "what does the {n} distribution look like{of}{filters}{group}{time}?",
)


@_frame
def _heatmap(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    col = b.rng.choice(b.measures())
    clauses, groups = _filters_and_groups(b, max_groups=1)
    phrase, duration = b.time()
    of = b.rng.choice(("", f" for {b.entity()}"))
    i, variant = _pick(b, _HEATMAP)
    question = _render(
        b,
        variant,
        phrase,
        "",
        n=b.noun(col),
        of=of,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([{"op": "HEATMAP", "column": col.name}], clauses, groups, duration)


_OR = (
    ("how many {entity}{filters}{group}{time}?", "count"),
    ("count {entity}{filters}{group}{time}", "count"),
    ("number of {entity}{filters}{group}{time}", "count"),
    ("show the {calc}{of}{filters}{group}{time}", "calc"),
    ("what's the {calc}{of}{filters}{group}{time}?", "calc"),
)


@_frame
def _or_filter(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    rng = b.rng
    clauses = b.filters(2, predicate_only=True)
    if len(clauses) < 2:
        return None
    i, (variant, needs) = _pick(b, _OR)
    text, calc = b.calc("COUNT", None) if needs == "count" else b.measure_calc()
    dims = b.dims(exclude=tuple(c.flt["column"] for c in clauses))
    groups = rng.sample(dims, min(rng.randint(0, 1), len(dims)))
    phrase, duration = b.time()
    of = f" of {b.entity()}"
    question = _render(
        b,
        variant,
        phrase,
        "",
        entity=b.entity(),
        calc=text,
        of=of,
        filters=b.filter_text(clauses, "OR"),
        group=b.group_text(groups),
    )
    return question, i, _query([calc], clauses, groups, duration, combination="OR")


_FRAME_WEIGHTS = {
    "aggregate": 4,
    "count": 2,
    "count_distinct": 1,
    "top_n": 3,
    "multi_calc": 1,
    "heatmap": 0.7,
    "or_filter": 1,
}


def _render(b: _Builder, variant: str, time_phrase: str, suffix: str, **parts: str) -> str:
    """Fill a wording template; the time phrase goes at the end or, sometimes, in front."""
    front = bool(time_phrase) and b.rng.random() < 0.2
    text = variant.format(time="" if front or not time_phrase else " " + time_phrase, **parts)
    question_mark = text.endswith("?")
    text = text.rstrip("?") + suffix + ("?" if question_mark else "")
    if front:
        text = f"{time_phrase}, {text}"
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] if b.rng.random() < 0.5 else text


def generate_example(rng: random.Random) -> Example:
    """Draw one example (schema, question, query) from ``rng``."""
    names, weights = list(_FRAME_WEIGHTS), list(_FRAME_WEIGHTS.values())
    while True:
        b = _Builder(rng)
        name = rng.choices(names, weights)[0]
        result = _FRAMES[name](b)
        if result is None:
            continue
        question, variant, query = result
        example = Example(question, b.pairs(), query, f"{name}/{variant}", b.domain.name)
        if MIN_COMPLETION_CHARS <= len(example.completion) <= MAX_COMPLETION_CHARS:
            return example


def format_prompt(question: str, columns: list[tuple[str, str]]) -> str:
    """The user message: instruction, the schema as ``name (type)`` lines, then the question."""
    schema = "\n".join(f"{name} ({kind})" for name, kind in columns)
    return f"{INSTRUCTION}\n\nColumns:\n{schema}\n\nQuestion: {question}"


_SCHEMA_LINE = re.compile(r"^(\S+) \((string|integer|float|boolean)\)$")


def columns_from_prompt(prompt: str) -> dict[str, str]:
    """Recover the ``{column: type}`` schema from a prompt made by :func:`format_prompt`."""
    block = prompt.split("\n\nColumns:\n", 1)[1].split("\n\n", 1)[0]
    return {m[1]: m[2] for line in block.splitlines() if (m := _SCHEMA_LINE.match(line))}


def make_task_splits(
    seed: int = 0, n_train: int = 2000, n_validation: int = 200, n_test: int = 200
) -> dict[str, list[dict[str, str]]]:
    """Generate train/validation/test records ``{"prompt", "completion", "id"}`` with no prompt shared."""
    rng = random.Random(seed)
    sizes = dict(zip(SPLITS, (n_train, n_validation, n_test), strict=True))
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, size in sizes.items():
        records = splits[split] = []
        while len(records) < size:
            example = generate_example(rng)
            if example.prompt in seen:
                continue
            seen.add(example.prompt)
            records.append(
                {
                    "prompt": example.prompt,
                    "completion": example.completion,
                    "id": f"{split}-{len(records):05d}",
                }
            )
    return splits


TASK_DATA = GeneratedSplits(
    make_task_splits,
    {"format_version": FORMAT_VERSION},
    (2000, 200, 200),
    "medusa-lora make-task-data",
    "generate the built-in NL-to-query task dataset",
    Path("data/task"),
)
write_task_data = TASK_DATA.write  # prompt/completion splits, reused if made with the same parameters
main = TASK_DATA.main
