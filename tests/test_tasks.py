"""Tests for the built-in demo task data, the query validator/scorer and the generic prompts."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_lora.eval.tasks import query_data, tool_calls
from medusa_lora.eval.tasks.data_files import load_data
from medusa_lora.eval.tasks.generic_prompts import (
    POOLS,
    TEMPLATES,
    draw_generic_prompts,
    make_generic_prompts,
    write_generic_prompts,
)
from medusa_lora.eval.tasks.generic_prompts import main as generic_prompts_main
from medusa_lora.eval.tasks.query_data import (
    COMMON_COLUMNS,
    DOMAINS,
    MAX_COLUMNS,
    MIN_COLUMNS,
    columns_from_prompt,
    format_prompt,
    generate_example,
    make_task_splits,
    write_task_data,
)
from medusa_lora.eval.tasks.query_data import main as task_data_main
from medusa_lora.eval.tasks.query_schema import (
    CALC_OPS,
    DURATION_UNITS,
    FILTER_OPS,
    QUERY_KEYS,
    canonical_query,
    dump_query,
    duration_seconds,
    parse_query,
    score_outputs,
    validate_query,
)
from medusa_lora.eval.tasks.tool_calls import write_tool_call_data
from medusa_lora.records import read_records, record_layout, split_record

COLUMNS = {
    "duration_ms": "float",
    "service.name": "string",
    "http.status_code": "integer",
    "error": "boolean",
    "user.id": "string",
    "region": "string",
}
GOOD = {
    "calculations": [{"op": "P95", "column": "duration_ms"}, {"op": "COUNT"}],
    "filters": [
        {"column": "error", "op": "=", "value": True},
        {"column": "http.status_code", "op": ">=", "value": 500},
    ],
    "filter_combination": "OR",
    "breakdowns": ["region"],
    "orders": [
        {"op": "P95", "column": "duration_ms", "order": "descending"},
        {"column": "region", "order": "ascending"},
    ],
    "time_range": "1h",
    "limit": 10,
}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, str]]]:
    return make_task_splits(seed=0)


@pytest.fixture(scope="module")
def examples() -> list:
    rng = random.Random(123)
    return [generate_example(rng) for _ in range(1500)]


# --- generated data -----------------------------------------------------------------------------------------
def test_splits_have_requested_sizes_and_fields(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "validation": 200, "test": 200}
    for name, records in splits.items():
        assert all(set(r) == {"prompt", "completion", "id"} for r in records)
        assert len({r["id"] for r in records}) == len(records)
        assert all(r["id"].startswith(name) for r in records)


def test_same_seed_same_data_other_seed_different():
    a = make_task_splits(seed=7, n_train=50, n_validation=10, n_test=10)
    assert a == make_task_splits(seed=7, n_train=50, n_validation=10, n_test=10)
    b = make_task_splits(seed=8, n_train=50, n_validation=10, n_test=10)
    assert [r["prompt"] for r in a["train"]] != [r["prompt"] for r in b["train"]]


def test_every_target_is_compact_and_valid_for_its_schema(splits):
    for records in splits.values():
        for r in records:
            query = parse_query(r["completion"])
            assert query is not None
            assert validate_query(query, columns_from_prompt(r["prompt"])) == [], r
            assert r["completion"] == dump_query(query)  # compact, fixed key order
            assert list(query) == [k for k in QUERY_KEYS if k in query]


def test_splits_are_disjoint(splits):
    prompts = [{r["prompt"] for r in records} for records in splits.values()]
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == 2400


def test_variety(splits, examples):
    train = splits["train"]
    assert len({r["prompt"].rsplit("Question: ", 1)[1] for r in train}) / len(train) > 0.98
    assert len({r["completion"] for r in train}) / len(train) > 0.9
    templates = Counter(e.template for e in examples)
    assert len(templates) >= 50
    assert len({t.split("/")[0] for t in templates}) == 7
    assert {e.domain for e in examples} == {d.name for d in DOMAINS}
    assert len({e.columns for e in examples}) > 1400
    ops = {c["op"] for e in examples for c in e.query["calculations"]}
    assert ops == set(CALC_OPS)
    filter_ops = {f["op"] for e in examples for f in e.query.get("filters", [])}
    assert filter_ops == set(FILTER_OPS)
    assert any("limit" in e.query for e in examples)
    assert any("filter_combination" in e.query for e in examples)


def test_schema_sizes_and_completion_lengths(examples):
    assert all(MIN_COLUMNS <= len(e.columns) <= MAX_COLUMNS for e in examples)
    lengths = [len(e.completion) for e in examples]
    assert 120 < sum(lengths) / len(lengths) < 260


def test_time_phrases_map_to_durations(examples):
    expected = {
        "yesterday": "1d",
        "past week": "7d",
        "last 2 hours": "2h",
        "past hour": "1h",
        "last 48 hours": "48h",
    }
    seen = set()
    for e in examples:
        for phrase, duration in expected.items():
            if re.search(rf"\b{phrase}\b", e.question):
                assert e.query["time_range"] == duration, e.question
                seen.add(phrase)
    assert seen == set(expected)
    assert all(duration_seconds(e.query["time_range"]) for e in examples)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45m", 2700),
        ("8h", 28800),
        ("7d", 604800),
        ("48h", 172800),
        ("0h", None),
        ("7 d", None),
        ("1w", None),
        (7200, None),
        ("2h ", None),
    ],
)
def test_duration_seconds(text, seconds):
    assert duration_seconds(text) == seconds


def test_equal_durations_match_exactly():
    assert canonical_query(GOOD | {"time_range": "48h"}) == canonical_query(GOOD | {"time_range": "2d"})
    assert canonical_query(GOOD | {"time_range": "24h"}) != canonical_query(GOOD | {"time_range": "2d"})


def test_top_n_questions_carry_limit_and_order(examples):
    for e in examples:
        match = re.search(r"\b(?:top|bottom|which) (\d+) ", e.question, re.IGNORECASE)
        if e.template.startswith("top_n") and match:
            assert e.query["limit"] == int(match[1])
            assert len(e.query["orders"]) == 1 and e.query["breakdowns"]


def test_catalogue_nouns_are_unambiguous():
    columns = list(COMMON_COLUMNS) + [c for d in DOMAINS for c in d.columns]
    assert len({c.name for c in columns}) == len(columns)
    nouns = [n.lower() for c in columns for n in c.nouns]
    assert [n for n, k in Counter(nouns).items() if k > 1] == []


def test_format_prompt_round_trips_schema():
    cols = [("duration_ms", "float"), ("service.name", "string"), ("error", "boolean")]
    prompt = format_prompt("how many errors?", cols)
    assert prompt.endswith("Question: how many errors?")
    assert "duration_ms (float)" in prompt
    assert columns_from_prompt(prompt) == dict(cols)


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_any_seed_gives_valid_targets(seed):
    rng = random.Random(seed)
    for _ in range(20):
        e = generate_example(rng)
        assert validate_query(json.loads(e.completion), dict(e.columns)) == []


# --- validator ----------------------------------------------------------------------------------------------
def test_validator_accepts_good_query():
    assert validate_query(GOOD, COLUMNS) == []
    assert validate_query(GOOD, list(COLUMNS.items())) == []


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"calculations": [{"op": "AVG", "column": "latency"}]}, "unknown column 'latency'"),
        ({"calculations": [{"op": "MEDIAN", "column": "duration_ms"}]}, "unknown op 'MEDIAN'"),
        ({"calculations": [{"op": "AVG", "column": "region"}]}, "needs a numeric column"),
        ({"calculations": [{"op": "COUNT", "column": "region"}]}, "COUNT takes no column"),
        ({"calculations": []}, "at least one calculation"),
        ({"filters": [{"column": "http.status_code", "op": "=", "value": "500"}]}, "not match type integer"),
        ({"filters": [{"column": "error", "op": "=", "value": "true"}]}, "does not match type boolean"),
        ({"filters": [{"column": "duration_ms", "op": ">", "value": True}]}, "does not match type float"),
        ({"filters": [{"column": "region", "op": "like", "value": "us"}]}, "unknown op 'like'"),
        ({"filters": [{"column": "region", "op": ">", "value": "us"}]}, "needs a numeric column"),
        ({"filters": [{"column": "duration_ms", "op": "contains", "value": "5"}]}, "needs a string column"),
        ({"filters": [{"column": "region", "op": "exists", "value": "x"}]}, "takes no value"),
        ({"filters": [{"column": "region", "op": "="}]}, "needs a value"),
        ({"filters": [{"column": "region", "op": "in", "value": []}]}, "non-empty list"),
        ({"filters": [{"column": "pod", "op": "exists"}]}, "unknown column 'pod'"),
        ({"filter_combination": "XOR"}, "must be 'AND' or 'OR'"),
        ({"filters": [], "filter_combination": "OR"}, "needs at least two filters"),
        ({"breakdowns": ["k8s.pod.name"]}, "unknown column 'k8s.pod.name'"),
        ({"breakdowns": ["region", "region"], "orders": []}, "duplicate column"),
        ({"orders": [{"op": "P99", "column": "duration_ms", "order": "descending"}]}, "not reference a calc"),
        ({"orders": [{"column": "service.name", "order": "ascending"}]}, "calculation or breakdown"),
        ({"orders": [{"op": "COUNT", "order": "down"}]}, "'ascending' or 'descending'"),
        ({"time_range": -5}, "time_range: must be a duration"),
        ({"time_range": 3600}, "time_range: must be a duration"),
        ({"time_range": "3 hours"}, "time_range: must be a duration"),
        ({"limit": 2.5}, "limit: must be a positive integer"),
        ({"limit": True}, "limit: must be a positive integer"),
        ({"granularity": 60}, "unknown key 'granularity'"),
    ],
)
def test_validator_catches_broken_queries(change, fragment):
    errors = validate_query(GOOD | change, COLUMNS)
    assert any(fragment in e for e in errors), errors


def test_validator_rejects_non_objects():
    assert validate_query([], COLUMNS) == ["query must be a JSON object"]
    assert validate_query({"calculations": "COUNT"}, COLUMNS) == ["calculations: must be a list"]


def test_validator_heatmap_order_and_float_accepts_int():
    query = {
        "calculations": [{"op": "HEATMAP", "column": "duration_ms"}],
        "orders": [{"op": "HEATMAP", "column": "duration_ms", "order": "descending"}],
    }
    assert any("HEATMAP" in e for e in validate_query(query, COLUMNS))
    query = {"calculations": [{"op": "COUNT"}], "filters": [{"column": "duration_ms", "op": ">", "value": 5}]}
    assert validate_query(query, COLUMNS) == []


# --- parsing and scoring ------------------------------------------------------------------------------------
def test_parse_query_tolerates_wrapping():
    assert parse_query('{"calculations":[{"op":"COUNT"}]}') == {"calculations": [{"op": "COUNT"}]}
    assert parse_query('```json\n{"limit": 5}\n```') == {"limit": 5}
    assert parse_query('{"limit": 5} and some text') == {"limit": 5}
    assert parse_query("no json here") is None
    assert parse_query('{"limit": ') is None
    assert parse_query("[1, 2]") is None


def test_canonical_query_ignores_defaults_and_filter_order():
    a = {
        "calculations": [{"op": "COUNT"}],
        "filters": [{"column": "a", "op": "exists"}, {"column": "b", "op": "=", "value": 500.0}],
        "filter_combination": "AND",
        "breakdowns": [],
    }
    b = {
        "filters": [{"column": "b", "op": "=", "value": 500}, {"column": "a", "op": "exists"}],
        "calculations": [{"op": "COUNT"}],
    }
    assert canonical_query(a) == canonical_query(b)
    assert canonical_query(a) != canonical_query(b | {"filter_combination": "OR"})


def test_score_outputs_hand_made_cases():
    ref = dump_query(GOOD)
    reordered = json.dumps({k: GOOD[k] for k in reversed(list(GOOD))}, indent=2)
    wrong_but_valid = dump_query(GOOD | {"limit": 5})
    invalid = dump_query(GOOD | {"breakdowns": ["nope"]})
    predictions = [ref, "Here you go: " + reordered, wrong_but_valid, invalid, "not json"]
    scores = score_outputs(predictions, [ref] * 5, [COLUMNS] * 5)
    assert scores == {"valid_json_rate": 3 / 5, "exact_match": 2 / 5, "n": 5}
    assert score_outputs([], [], []) == {"valid_json_rate": 0.0, "exact_match": 0.0, "n": 0}
    with pytest.raises(ValueError):
        score_outputs([ref], [], [])


def test_score_outputs_on_generated_references(splits):
    records = splits["test"][:50]
    refs = [r["completion"] for r in records]
    cols = [columns_from_prompt(r["prompt"]) for r in records]
    assert score_outputs(refs, refs, cols) == {"valid_json_rate": 1.0, "exact_match": 1.0, "n": 50}


# --- writing ------------------------------------------------------------------------------------------------
def test_write_task_data_is_idempotent_and_checks_parameters(tmp_path):
    sizes = {"n_train": 20, "n_validation": 5, "n_test": 5}
    paths = write_task_data(tmp_path, seed=3, **sizes)
    assert set(paths) == {"train", "validation", "test"}
    lines = paths["train"].read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0]).keys() == {"prompt", "completion", "id"}
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 3
    mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}

    assert write_task_data(tmp_path, seed=3, **sizes) == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mtimes

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_task_data(tmp_path, seed=4, **sizes)
    write_task_data(tmp_path, seed=4, overwrite=True, **sizes)
    assert json.loads((tmp_path / "meta.json").read_text())["seed"] == 4
    assert paths["train"].read_text().splitlines() != lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]


def test_write_task_data_refuses_foreign_files_and_restores_missing(tmp_path):
    (tmp_path / "train.jsonl").write_text("mine\n")
    with pytest.raises(FileExistsError):
        write_task_data(tmp_path, n_train=5, n_validation=2, n_test=2)
    other = tmp_path / "other"
    paths = write_task_data(other, n_train=5, n_validation=2, n_test=2)
    text = paths["test"].read_text()
    paths["test"].unlink()
    write_task_data(other, n_train=5, n_validation=2, n_test=2)
    assert paths["test"].read_text() == text


# --- generic prompts ----------------------------------------------------------------------------------------
_TASK_WORDS = re.compile(
    r"\b(json|query|queries|columns?|latency|logs?|logging|metrics?|traces?|tracing|spans?|databases?|"
    r"dashboards?|observability|sql|schemas?|telemetry)\b",
    re.IGNORECASE,
)


def test_generic_prompts_distinct_deterministic_and_off_task():
    prompts = make_generic_prompts(seed=0, n=3000)
    assert len(prompts) == 3000 == len(set(prompts))
    assert prompts == make_generic_prompts(seed=0, n=3000)
    assert prompts[:300] != make_generic_prompts(seed=1)
    assert make_generic_prompts(seed=0, n=50) == prompts[:50]
    assert [p for p in prompts if _TASK_WORDS.search(p) or "Columns:" in p] == []
    assert make_generic_prompts(seed=0, n=0) == []


def test_generic_prompt_kinds_are_balanced():
    kinds = Counter(kind for kind, _ in draw_generic_prompts(seed=0, n=2000))
    assert set(kinds) == set(TEMPLATES) and len(TEMPLATES) >= 20
    assert max(kinds.values()) <= 0.10 * 2000
    assert kinds["math"] <= 0.05 * 2000
    assert min(kinds.values()) >= 0.02 * 2000


def test_write_generic_prompts_splits_disjoint_and_train_matches_generic_source(tmp_path):
    paths = write_generic_prompts(tmp_path, n_train=40, n_validation=10, n_test=10, seed=3)
    records = {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}
    assert {s: len(r) for s, r in records.items()} == {"train": 40, "validation": 10, "test": 10}
    assert records["test"][0] == {"id": "generic-test-00000", "prompt": records["test"][0]["prompt"]}
    prompts = [r["prompt"] for split in records.values() for r in split]
    assert len(set(prompts)) == 60
    assert [r["prompt"] for r in records["train"]] == make_generic_prompts(seed=3, n=40)
    text = paths["test"].read_text()
    assert write_generic_prompts(tmp_path, n_train=40, n_validation=10, n_test=10, seed=3) == paths
    assert paths["test"].read_text() == text
    with pytest.raises(FileExistsError):
        write_generic_prompts(tmp_path, n_train=40, n_validation=10, n_test=10, seed=4)
    write_generic_prompts(tmp_path, n_train=40, n_validation=10, n_test=10, seed=4, overwrite=True)
    assert paths["test"].read_text() != text


def test_make_generic_prompts_command(tmp_path, capsys):
    argv = ["--out-dir", str(tmp_path), "--n-train", "6", "--n-validation", "2", "--n-test", "2"]
    assert generic_prompts_main(argv) == 0
    assert "train.jsonl" in capsys.readouterr().out
    assert len((tmp_path / "validation.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        generic_prompts_main([*argv, "--seed", "1"])
    assert generic_prompts_main([*argv, "--seed", "1", "--overwrite"]) == 0


def test_make_task_data_command(tmp_path, capsys):
    argv = ["--out-dir", str(tmp_path), "--n-train", "4", "--n-validation", "2", "--n-test", "2"]
    assert task_data_main(argv) == 0
    assert "train.jsonl" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        task_data_main([*argv, "--seed", "1"])
    assert task_data_main([*argv, "--seed", "1", "--overwrite"]) == 0


def test_tool_call_data_is_a_messages_dataset_train_reads(tmp_path):
    paths = write_tool_call_data(tmp_path, seed=3, n_train=60, n_validation=10, n_test=10)
    user_turns = {}
    for split, path in paths.items():
        records = read_records(path)
        layout = record_layout(records, str(path))
        examples = [split_record(record, layout, str(path), i) for i, record in enumerate(records)]
        assert len(examples) == {"train": 60, "validation": 10, "test": 10}[split]
        user_turns[split] = {r["messages"][1]["content"] for r in records}
        for record, (prompt, answer) in zip(records, examples):
            system, user, assistant = record["messages"]
            assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
            assert answer == assistant["content"]
            call = json.loads(answer)
            listed = [json.loads(line) for line in system["content"].split("Functions:\n")[1].splitlines()]
            spec = next(s for s in listed if s["name"] == call["name"])  # the called function is listed
            assert sorted(spec["parameters"]) == sorted(call["arguments"])
            for value in call["arguments"].values():  # every value is taken from (or is) the request
                assert (
                    isinstance(value, (bool, int, float))
                    or value.split()[-1].strip("?.").lower() in user["content"].lower()
                )
    assert not user_turns["train"] & user_turns["test"] and not user_turns["validation"] & user_turns["test"]
    assert write_tool_call_data(tmp_path, seed=3, n_train=60, n_validation=10, n_test=10) == paths  # reused
    with pytest.raises(FileExistsError):
        write_tool_call_data(tmp_path, seed=4, n_train=60, n_validation=10, n_test=10)


# --- the generators' data files -----------------------------------------------------------------------------
# sha256 of each split file the data commands write with their defaults (seed 0, default sizes), recorded
# from the Python-literal version of the word pools, catalogue and wording, before they moved into
# eval/tasks/data/: a change here means the generated data changed (a data file edited, or a value's type
# changed on loading). The task's: format 3 (schemas of 6-12 columns, time ranges as durations).
GOLDEN_SPLIT_SHA256 = {
    "task": {
        "train": "eb779813be815a2e2df33a154afdcd8de29e1e02c739784aeff18d39e7ad3d61",
        "validation": "76f0a1de08d5c65f853afb7591c8f309661a1adbf9fad34dd7faced670cfeaed",
        "test": "c5f4506c90004c44885e7003dd0115b58f5e9c1bdac81f5c9cbb56e0edd9fcca",
    },
    "generic": {
        "train": "c483e963021a157dcf91ea4e18be14218c183e953f60ece880d8bf963608bbad",
        "validation": "051274fe89f14c4d0c926748aeff1a9bd2d64b7830fe511480b43fe4d9a1965c",
        "test": "54b6804a67088c3e30f13e2a25acf7620d180a03ad2128bdc5c50fa239ae390e",
    },
    "tools": {
        "train": "b0bbc4e0f84041b82841495e8bbee620a10c94df667f705a9013f40538f9e829",
        "validation": "906162eabed2ab2ed94d53158853c20298ec57c788c26a9887894b2e45c2e8fb",
        "test": "b19c76f35e9c1f816bf227014a0816c8cbb151c8a87195309072a1877a9393af",
    },
}


def test_default_splits_are_unchanged(tmp_path):
    writers = {"task": write_task_data, "generic": write_generic_prompts, "tools": write_tool_call_data}
    hashes = {
        name: {
            split: hashlib.sha256(path.read_bytes()).hexdigest()
            for split, path in write(tmp_path / name).items()
        }
        for name, write in writers.items()
    }
    assert hashes == GOLDEN_SPLIT_SHA256


DATA_FILES = (
    "query_catalogue.yaml",
    "query_phrases.yaml",
    "generic_prompt_templates.yaml",
    "generic_prompt_pools.yaml",
    "tool_calls.yaml",
)


@pytest.mark.parametrize("name", DATA_FILES)
def test_data_files_load_and_are_not_empty(name):
    data = load_data(name)
    assert isinstance(data, dict) and data
    assert all(isinstance(key, str) and value for key, value in data.items())  # no empty or non-string key


def _strings(values) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, str) for v in values)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_loaded_catalogue_and_wording_keep_their_types():
    # YAML turns bare yes/no/on into booleans, 1. into a float, 10:15 into an int and 2026-03-02 into a date.
    columns = list(COMMON_COLUMNS) + [c for d in DOMAINS for c in d.columns]
    flags = ("dim", "distinct", "additive", "latency")
    words = ("types", "nouns", "prefixes", "substrings", "yes", "no")
    for c in columns:
        assert isinstance(c.name, str) and set(c.types) <= {"string", "integer", "float", "boolean"}
        assert c.types and c.nouns and all(_strings(getattr(c, f)) for f in words), c
        assert isinstance(c.values, tuple) and all(isinstance(v, str) or type(v) is int for v in c.values), c
        assert isinstance(c.thresholds, tuple) and all(map(_number, c.thresholds)), c
        assert isinstance(c.fmt, str) and "{v}" in c.fmt
        assert all(isinstance(getattr(c, f), bool) for f in flags)
        assert bool(c.yes) == bool(c.no) == (c.types == ("boolean",))
    by_name = {c.name: c for c in columns}
    version = by_name["service.version"]
    assert version.values[0] == "1.4.2" and version.prefixes == ("1.", "2.")
    assert by_name["http.status_code"].values[0] == 200 and by_name["fraud.score"].thresholds[0] == 0.5
    for d in DOMAINS:
        assert _strings(d.entities) and set(d.overrides) == {"service.name", "http.route"}
        assert all(_strings(o["values"]) and o["values"] for o in d.overrides.values())
    assert all(_strings(k) and _strings(v) and v for k, v in query_data._POST_PHRASES.items())
    for table, ops in ((query_data._VERBAL_PREDICATES, FILTER_OPS), (query_data._CALC_PHRASES, CALC_OPS)):
        assert set(table) == set(ops) and all(_strings(v) and v for v in table.values())
    assert all(isinstance(v, str) for v in query_data._SYMBOLIC_PREDICATES.values())
    assert _strings(query_data._FIVE_XX) and _strings(query_data._TIME_LEADS)
    for unit, short, counts in query_data._TIME_UNITS:
        assert isinstance(unit, str) and short in DURATION_UNITS
        assert isinstance(counts, tuple) and all(type(n) is int for n in counts)
    assert all(isinstance(p, str) and duration_seconds(d) for p, d in query_data._NAMED_TIMES)


def test_loaded_generic_pools_and_tool_call_values_keep_their_types():
    assert all(_strings(v) and v for v in TEMPLATES.values())
    assert all(_strings(v) and v for v in POOLS.values())
    assert POOLS["count"] == ("3", "5", "7", "10")
    fields = {m[1] for templates in TEMPLATES.values() for t in templates for m in re.finditer(r"{(\w+)}", t)}
    assert fields - set(POOLS) == {"problem"}
    for name in ("CITIES", "PEOPLE", "DAYS", "TIMES", "CURRENCIES", "TOPICS", "LANGUAGES", "PHRASES"):
        values = getattr(tool_calls, name)
        assert isinstance(values, list) and values and _strings(tuple(values)), name
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d", d) for d in tool_calls.DAYS)
    assert all(re.fullmatch(r"\d\d:\d\d", t) for t in tool_calls.TIMES)
    assert all(isinstance(song, tuple) and len(song) == 2 and _strings(song) for song in tool_calls.SONGS)
