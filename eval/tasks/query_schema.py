"""Query schema for the natural-language-to-query task: validation, parsing and scoring.

A query is a JSON object with the keys of ``QUERY_KEYS`` (in that order when serialised):
``calculations`` (required), ``filters``, ``filter_combination`` (``"OR"``; ``"AND"`` is the
default), ``breakdowns``, ``orders``, ``time_range`` (a duration: a whole number and a unit, ``m``,
``h`` or ``d``, e.g. ``"30m"``, ``"7d"``; ``duration_seconds`` converts it for an API that takes seconds) and
``limit``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

QUERY_KEYS = ("calculations", "filters", "filter_combination", "breakdowns", "orders", "time_range", "limit")
CALC_OPS = ("COUNT", "COUNT_DISTINCT", "SUM", "AVG", "MIN", "MAX", "P50", "P90", "P95", "P99", "HEATMAP")
FILTER_OPS = ("=", "!=", ">", ">=", "<", "<=", "exists", "does-not-exist", "contains", "starts-with", "in")
COLUMN_TYPES = ("string", "integer", "float", "boolean")
NUMERIC_TYPES = ("integer", "float")
ORDER_DIRECTIONS = ("ascending", "descending")
DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400}  # seconds a unit
_DURATION = re.compile(r"([1-9][0-9]*)([mhd])")

_NUMERIC_CALC_OPS = frozenset(CALC_OPS) - {"COUNT", "COUNT_DISTINCT"}
_COMPARISON_OPS = frozenset({">", ">=", "<", "<="})
_UNARY_OPS = frozenset({"exists", "does-not-exist"})
_STRING_OPS = frozenset({"contains", "starts-with"})

Columns = Mapping[str, str] | Sequence[tuple[str, str]]


def dump_query(query: Mapping[str, Any]) -> str:
    """Serialise a query as compact JSON with the fixed key order, omitting empty or absent keys."""
    ordered = {key: query[key] for key in QUERY_KEYS if query.get(key) not in (None, [], "")}
    return json.dumps(ordered, separators=(",", ":"))


def matches_type(value: Any, column_type: str) -> bool:
    """Whether a JSON value is acceptable for a column of ``column_type``."""
    if column_type == "string":
        return isinstance(value, str)
    if column_type == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if column_type == "integer":
        return isinstance(value, int)
    return column_type == "float" and isinstance(value, (int, float))


def duration_seconds(value: Any) -> int | None:
    """Seconds of a duration such as ``"45m"``, ``"8h"`` or ``"7d"``; None for anything else."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    return int(match[1]) * DURATION_UNITS[match[2]] if match else None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_keys(item: Mapping[str, Any], allowed: set[str], where: str) -> list[str]:
    return [f"{where}: unknown key {key!r}" for key in item if key not in allowed]


def _validate_calculation(calc: Any, i: int, columns: Mapping[str, str]) -> list[str]:
    where = f"calculations[{i}]"
    if not isinstance(calc, dict):
        return [f"{where}: must be an object"]
    errors = _check_keys(calc, {"op", "column"}, where)
    op, column = calc.get("op"), calc.get("column")
    if op not in CALC_OPS:
        return [*errors, f"{where}: unknown op {op!r}"]
    if op == "COUNT":
        if "column" in calc:
            errors.append(f"{where}: COUNT takes no column")
        return errors
    if column not in columns:
        return [*errors, f"{where}: unknown column {column!r}"]
    if op in _NUMERIC_CALC_OPS and columns[column] not in NUMERIC_TYPES:
        errors.append(f"{where}: {op} needs a numeric column, {column!r} is {columns[column]}")
    return errors


def _validate_filter(flt: Any, i: int, columns: Mapping[str, str]) -> list[str]:
    where = f"filters[{i}]"
    if not isinstance(flt, dict):
        return [f"{where}: must be an object"]
    errors = _check_keys(flt, {"column", "op", "value"}, where)
    column, op = flt.get("column"), flt.get("op")
    if column not in columns:
        errors.append(f"{where}: unknown column {column!r}")
    if op not in FILTER_OPS:
        errors.append(f"{where}: unknown op {op!r}")
    if errors:
        return errors
    column_type = columns[column]
    if op in _UNARY_OPS:
        return [f"{where}: {op} takes no value"] if "value" in flt else []
    if "value" not in flt:
        return [f"{where}: {op} needs a value"]
    value = flt["value"]
    if op in _COMPARISON_OPS and column_type not in NUMERIC_TYPES:
        return [f"{where}: {op} needs a numeric column, {column!r} is {column_type}"]
    if op in _STRING_OPS and column_type != "string":
        return [f"{where}: {op} needs a string column, {column!r} is {column_type}"]
    if op == "in":
        if not isinstance(value, list) or not value:
            return [f"{where}: 'in' needs a non-empty list value"]
        values = value
    else:
        values = [value]
    return [
        f"{where}: value {v!r} does not match type {column_type} of {column!r}"
        for v in values
        if not matches_type(v, column_type)
    ]


def _validate_order(order: Any, i: int, calcs: set[tuple[Any, Any]], breakdowns: set[Any]) -> list[str]:
    where = f"orders[{i}]"
    if not isinstance(order, dict):
        return [f"{where}: must be an object"]
    errors = _check_keys(order, {"op", "column", "order"}, where)
    if order.get("order") not in ORDER_DIRECTIONS:
        errors.append(f"{where}: order must be 'ascending' or 'descending'")
    if "op" in order:
        if order["op"] == "HEATMAP":
            errors.append(f"{where}: cannot order by HEATMAP")
        elif (order["op"], order.get("column")) not in calcs:
            errors.append(f"{where}: does not reference a calculation")
    elif order.get("column") not in breakdowns:
        errors.append(f"{where}: does not reference a calculation or breakdown")
    return errors


def _validate_list(obj: Mapping[str, Any], key: str) -> tuple[list[Any], list[str]]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        return [], [f"{key}: must be a list"]
    return value, []


def validate_query(obj: Any, columns: Columns) -> list[str]:
    """Return human-readable problems with ``obj`` as a query over ``columns`` (empty list: valid)."""
    if not isinstance(obj, dict):
        return ["query must be a JSON object"]
    columns = dict(columns)
    errors = [f"unknown key {key!r}" for key in obj if key not in QUERY_KEYS]

    calcs, errs = _validate_list(obj, "calculations")
    errors += errs
    if not calcs and not errs:
        errors.append("calculations: at least one calculation is required")
    for i, calc in enumerate(calcs):
        errors += _validate_calculation(calc, i, columns)

    filters, errs = _validate_list(obj, "filters")
    errors += errs
    for i, flt in enumerate(filters):
        errors += _validate_filter(flt, i, columns)
    if "filter_combination" in obj:
        if obj["filter_combination"] not in ("AND", "OR"):
            errors.append("filter_combination: must be 'AND' or 'OR'")
        elif len(filters) < 2:
            errors.append("filter_combination: needs at least two filters")

    breakdowns, errs = _validate_list(obj, "breakdowns")
    errors += errs
    for i, column in enumerate(breakdowns):
        if not isinstance(column, str) or column not in columns:
            errors.append(f"breakdowns[{i}]: unknown column {column!r}")
    if len(set(map(str, breakdowns))) != len(breakdowns):
        errors.append("breakdowns: duplicate column")

    orders, errs = _validate_list(obj, "orders")
    errors += errs
    calc_keys = {(c.get("op"), c.get("column")) for c in calcs if isinstance(c, dict)}
    breakdown_keys = {b for b in breakdowns if isinstance(b, str)}
    for i, order in enumerate(orders):
        errors += _validate_order(order, i, calc_keys, breakdown_keys)

    if "time_range" in obj and duration_seconds(obj["time_range"]) is None:
        errors.append("time_range: must be a duration: a whole number and m, h or d, e.g. '30m', '7d'")
    if "limit" in obj and not _is_positive_int(obj["limit"]):
        errors.append("limit: must be a positive integer")
    return errors


def parse_query(text: str) -> dict[str, Any] | None:
    """Parse the first JSON object in ``text`` (tolerating fences or trailing text); None if there is none."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _normalise(value: Any) -> Any:
    """Integral floats become ints so ``500.0`` and ``500`` compare equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def canonical_query(obj: Mapping[str, Any]) -> str:
    """Canonical JSON text: defaults dropped, numbers normalised, durations in seconds (``"48h"`` is ``"2d"``),
    filters sorted (their order is moot)."""
    query = {k: _normalise(v) for k, v in obj.items() if v not in (None, [], "")}
    if duration_seconds(query.get("time_range")) is not None:
        query["time_range"] = duration_seconds(query["time_range"])
    if query.get("filter_combination") == "AND":
        del query["filter_combination"]
    if isinstance(query.get("filters"), list):
        query["filters"] = sorted(query["filters"], key=lambda f: json.dumps(f, sort_keys=True))
    return json.dumps(query, sort_keys=True, separators=(",", ":"))


def score_outputs(
    predictions: Sequence[str], references: Sequence[str], columns_per_example: Sequence[Columns]
) -> dict[str, float | int]:
    """Score generated queries: ``valid_json_rate`` (parses and validates), ``exact_match``, ``n``."""
    if not len(predictions) == len(references) == len(columns_per_example):
        raise ValueError("predictions, references and columns_per_example must have the same length")
    valid = exact = 0
    for prediction, reference, columns in zip(predictions, references, columns_per_example, strict=True):
        pred = parse_query(prediction)
        if pred is None:
            continue
        valid += not validate_query(pred, columns)
        ref = parse_query(reference)
        exact += ref is not None and canonical_query(pred) == canonical_query(ref)
    n = len(predictions)
    return {"valid_json_rate": valid / n if n else 0.0, "exact_match": exact / n if n else 0.0, "n": n}
