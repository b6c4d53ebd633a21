"""The eval runner: rows a-f on tiny random Llamas, the identity check, report.json/png, data formats,
scorer plug-ins and the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch
from peft import LoraConfig

from medusa_lora.cli.eval import _check_identical, main
from medusa_lora.decoding import generate
from medusa_lora.errors import ConfigError
from medusa_lora.eval import run
from medusa_lora.eval.examples import EvalExample
from medusa_lora.eval.report import format_quality_table, format_table, plot, read_json, write_json
from medusa_lora.eval.run import evaluate, hybrid_choice, with_generic_heads
from medusa_lora.eval.tasks.query_data import format_prompt
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees import choice as tree_choice
from medusa_lora.trees.tree import calibrated_tree
from medusa_lora.trees.tuning import DEFAULT_SIZES, StepCost

from conftest import CHAR_VOCAB, char_tokenizer, tiny_llama

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
VOCAB = CHAR_VOCAB
TASK_TREE = [[0], [1], [0, 0]]
MAX_NEW = 12


def tiny_models(base=None) -> tuple[MedusaLoraModel, MedusaLoraModel]:
    """A task model (LoRA + 3 heads + calibrated tree) and generic 2-head heads, on the same base weights."""
    base = base if base is not None else tiny_llama(vocab_size=len(VOCAB))
    task = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=3), LORA)
    task.config.tree = TASK_TREE
    generic = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=2))
    return task, generic


def examples(n: int = 3, seed: int = 0) -> list[EvalExample]:
    gen = torch.Generator().manual_seed(seed)
    return [
        EvalExample(f"test-{i}", torch.randint(3, len(VOCAB), (10,), generator=gen).tolist(), "{}")
        for i in range(n)
    ]


def decode(tokens: list[int]) -> str:
    return "".join(VOCAB[i] for i in tokens)


def exact(outputs, examples_):
    return {"exact_match": sum(o == e.reference for o, e in zip(outputs, examples_)) / len(outputs), "n": 3}


def break_task_heads(monkeypatch: pytest.MonkeyPatch, task: MedusaLoraModel) -> None:
    """Make row (c) (drafted by the task heads) emit a wrong last token."""

    def broken(model, prompt, *args, **kwargs):
        out = generate(model, prompt, *args, **kwargs)
        if kwargs.get("tree") is not None and model.heads is task.heads:
            out.tokens[-1] = (out.tokens[-1] + 1) % len(VOCAB)
        return out

    monkeypatch.setattr(run, "generate", broken)


@pytest.fixture(scope="module")
def report():
    task, generic = tiny_models()
    return evaluate(
        task,
        generic,
        examples(),
        MAX_NEW,
        warmup=1,
        decode=decode,
        scorer=exact,
        validation=examples(2, seed=1),
        progress=False,
    )


def test_rows_a_to_f_have_every_field(report):
    assert [r.key for r in report.rows] == ["a", "b", "c", "d", "e", "f"]
    for row in report.rows:
        assert len(row.prompts) == 3 and row.tokens_per_s > 0 and row.speedup > 0 and row.setting
        assert all(p.new_tokens == MAX_NEW == len(p.tokens) and p.wall_time_s > 0 for p in row.prompts)
        assert row.quality == {"exact_match": 0.0, "n": 3}
        assert row.mean_accepted_length is not None  # every row counts its decoder forwards
        steps = [n for p in row.prompts for n in p.accepted_lengths]
        assert sum(steps) == 3 * (MAX_NEW - 1)  # every token after the prefill's is a step's
    a, b, c, d, e, f = report.rows
    assert a.speedup == 1.0 and a.mean_accepted_length == 1.0 and not a.lossless
    assert b.lossless and c.lossless and e.lossless and f.lossless and not d.lossless
    # untrained heads have no hit rates: b uses the default tree, c its saved calibrated tree; never plain
    assert (b.tree_source, b.tree_size) == ("default", 16)
    assert (c.tree_source, c.tree_size) == ("calibrated", len(TASK_TREE) + 1)
    assert "n-gram" in d.setting and d.tuning and "suffix decoding, up to" in e.setting and e.tuning
    # the hybrid: row c's tree plus a suffix path tuned on the validation prompts (row e's depth, half, none),
    # or plain decoding (None); no prediction (the copy hits are unknown)
    depth = int(e.setting.split()[-2])
    tuned = [t["max_copy_tokens"] for t in f.tuning]
    assert tuned == [*sorted({depth, max(1, depth // 2), 0}, reverse=True), None]
    assert sum(t["chosen"] for t in f.tuning) == 1 and all(t["median_tok_s"] > 0 for t in f.tuning)
    best = hybrid_choice(f.tuning)
    assert best["chosen"] and f.predicted_tokens_per_step is None
    if best["max_copy_tokens"] is None:
        assert f.setting.startswith("plain decoding") and f.tree_size == 1
    else:
        assert f.tree_size == c.tree_size and c.setting in f.setting
        path = best["max_copy_tokens"]
        assert (f"suffix path of up to {path} tokens" if path else "no suffix path") in f.setting
    assert {"torch", "transformers", "cpu", "gpu", "dtype", "date"} <= set(report.environment)


def test_the_hybrid_takes_the_simplest_setting_within_the_margin_of_the_fastest():
    def sweep(*speeds: float) -> list[dict]:
        return [{"max_copy_tokens": d, "median_tok_s": s} for d, s in zip([4, 2, 0, None], speeds)]

    assert hybrid_choice(sweep(10.0, 30.0, 20.0, 10.0))["max_copy_tokens"] == 2  # the fastest, by far
    assert (
        hybrid_choice(sweep(10.5, 10.9, 9.0, 10.0))["max_copy_tokens"] is None
    )  # +9% over plain: a near tie
    assert hybrid_choice(sweep(11.1, 10.9, 9.0, 10.0))["max_copy_tokens"] == 2  # +11%; path 2 within 10% of 4
    assert hybrid_choice(sweep(12.5, 11.0, 9.0, 10.0))["max_copy_tokens"] == 4  # path 2 is 12% slower than 4
    assert hybrid_choice(sweep(11.1, 10.9, 9.0, 10.0), min_gain=0.2)["max_copy_tokens"] is None
    assert hybrid_choice(sweep(31.9, 31.0, 31.7, 15.5))["max_copy_tokens"] == 0  # a path tying heads alone
    assert hybrid_choice(sweep(9.0, 8.0, 7.0, 12.0))["max_copy_tokens"] is None  # plain decoding fastest


def test_speculative_rows_are_identical_to_a(report):
    assert [r.identical for r in report.rows] == [3] * 6
    assert report.mismatches == {}


def test_each_prompt_starts_one_row_later_after_plain_decoding_warms_up_on_the_longest(monkeypatch):
    calls = []
    make_setups = run.make_setups

    def recording(*args, **kwargs):
        def record(setup):
            return lambda ids: calls.append((setup.key, tuple(ids))) or setup.run(ids)

        return [dataclasses.replace(s, run=record(s)) for s in make_setups(*args, **kwargs)]

    monkeypatch.setattr(run, "make_setups", recording)
    task, generic = tiny_models()
    test, validation = examples(3), examples(2, seed=1)
    test[1] = EvalExample("long", test[1].prompt_ids * 2, "{}")
    evaluate(task, generic, test, MAX_NEW, warmup=1, validation=validation, progress=False)
    timed = [(key, ids) for key, ids in calls if ids in {tuple(e.prompt_ids) for e in test}]
    assert timed[0] == ("a", tuple(test[1].prompt_ids))  # the untimed warm-up, on the longest test prompt
    assert [key for key, _ in timed[1:]] == list("abcdefbcdefacdefab")
    assert {key for key, ids in calls if ids == tuple(validation[0].prompt_ids)} == set("abcdef")


def constant_models() -> tuple[MedusaLoraModel, MedusaLoraModel]:
    """Models whose greedy output is one token repeated, and whose heads all propose it at rank 0: every
    drafted row must then accept its tree's full depth at every step."""
    base = tiny_llama(vocab_size=len(VOCAB))
    base.model.norm.weight.data.zero_()  # the last hidden state is 0 ...
    base.lm_head = torch.nn.Linear(base.config.hidden_size, len(VOCAB), bias=True)
    with torch.no_grad():
        base.lm_head.bias.copy_(torch.linspace(0, 1, len(VOCAB)).flip(0))  # ... so token 0 always wins
    return tiny_models(base)


def test_tokens_per_step_is_the_accepted_depth():
    task, generic = constant_models()
    result = evaluate(
        task, generic, examples(2), 13, warmup=0, validation=examples(2, seed=1), progress=False
    )
    a, b, c, d, e, f = result.rows
    assert a.prompts[0].tokens == [0] * 13 and result.mismatches == {}
    assert c.mean_accepted_length == 3.0  # TASK_TREE is 2 deep: 2 drafts + the verified token, 12 = 4 x 3
    assert b.mean_accepted_length == 3.0  # the 16-node default tree on 2 heads is 2 deep too
    assert d.mean_accepted_length > 2 and e.mean_accepted_length > 2  # copying a repeated token pays
    if f.tree_size == 1:  # plain decoding won the hybrid's timed tuning (possible on a tiny model)
        assert f.setting.startswith("plain decoding") and f.mean_accepted_length == 1.0
        return
    # the setting is timed, so it varies; and the heads drop out of steps where they emit less than their
    # tree's measured cost (timed too), so only the deepest step is certain
    path = next(t["max_copy_tokens"] for t in f.tuning if t["chosen"])
    deepest = max(f.accepted_length_histogram)
    assert deepest > 3 if path > 2 else deepest <= 3  # a copy path deeper than the 2 heads, else the heads'


def test_the_hybrid_row_falls_back_to_plain_decoding_when_that_tunes_fastest(monkeypatch):
    calls = iter(range(1, 100))
    monkeypatch.setattr(
        run.peers, "interleaved_speeds", lambda runners, prompts: [[float(next(calls))] for _ in runners]
    )
    # every sweep's last setting is timed fastest: the hybrid's is plain decoding
    task, generic = tiny_models()
    result = evaluate(task, generic, examples(2), MAX_NEW, validation=examples(1, seed=1), progress=False)
    f = result.rows[-1]
    assert [t["chosen"] for t in f.tuning] == [False] * (len(f.tuning) - 1) + [True]
    assert f.tuning[-1]["max_copy_tokens"] is None and f.setting.startswith("plain decoding")
    assert f.tree_size == 1 and f.mean_accepted_length == 1.0 and f.identical == 2


def test_report_json_round_trips_and_png_is_written(report, tmp_path):
    path = write_json(report, tmp_path / "report.json")
    assert read_json(path) == report
    assert json.loads(path.read_text())["rows"][2]["prompts"][0]["accepted_lengths"]
    png = plot(report, tmp_path / "report.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    table = format_table(report).splitlines()
    assert table[0].split()[:3] == ["row", "setup", "tok/s"] and "exact_match" in table[0]
    assert "3/3 100%" in table[4]
    assert any(line.startswith("(b) ") and "16 nodes" in line for line in table[8:])


def test_an_auto_tree_row_records_every_tree_it_was_chosen_from(monkeypatch):
    task, _ = tiny_models()
    rates = [[0.9, 0.05], [0.8, 0.05], [0.7, 0.05]]
    task.config.hit_rates = rates
    costs = {size: 1.0 + 0.1 * (size - 1) for size in range(1, 33)}  # a plain step costs 1
    monkeypatch.setattr(
        tree_choice,
        "measure_step_costs",
        lambda model, trees: {tree: StepCost(0.0, costs[tree.size]) for tree in trees},
    )
    result = evaluate(task, None, examples(1), MAX_NEW, tree="auto", warmup=0, progress=False)
    c = result.row("c")
    weighed = {t["nodes"]: t for t in c.tuning}
    assert set(weighed) == {calibrated_tree(rates, n).size for n in DEFAULT_SIZES}  # 2 ranks x 3 heads: <= 15
    assert [t["nodes"] for t in c.tuning if t["chosen"]] == [c.tree_size]
    for t in c.tuning:
        assert t["relative_step_cost"] == pytest.approx(costs[t["nodes"]])
        assert t["expected_speedup"] == pytest.approx(t["predicted_tokens_per_step"] / costs[t["nodes"]])
    assert weighed[c.tree_size]["predicted_tokens_per_step"] == c.predicted_tokens_per_step
    best = max(c.tuning, key=lambda t: t["expected_speedup"])
    note = next(line for line in format_table(result).splitlines() if line.startswith("(c) tree of"))
    assert f"expected of {len(c.tuning)} trees weighed: {best['nodes']} nodes " in note


def test_a_speculative_row_that_differs_is_flagged(monkeypatch):
    task, generic = tiny_models()
    break_task_heads(monkeypatch, task)
    broken = evaluate(task, generic, examples(2), MAX_NEW, warmup=0, progress=False)
    assert [r.key for r in broken.rows] == ["a", "b", "c"]  # no validation prompts: no peer rows
    assert broken.mismatches == {"c": ["test-0", "test-1"]}
    assert broken.row("c").identical == 0 and broken.row("b").identical == 2


def test_a_mismatch_fails_only_in_fp32(monkeypatch, capsys):
    task, generic = tiny_models()
    break_task_heads(monkeypatch, task)
    broken = evaluate(task, generic, examples(1), MAX_NEW, warmup=0, progress=False)
    assert _check_identical(broken, "fp32") == 1 and "error:" in capsys.readouterr().err
    assert _check_identical(broken, "bf16") == 0 and "note: in bf16" in capsys.readouterr().err


def test_generic_heads_must_be_heads_only():
    task, _ = tiny_models()
    with pytest.raises(ConfigError, match="heads-only"):
        with_generic_heads(task, task)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Base dir (with tokenizer), task and generic dirs and test files in three formats, as the CLI reads them."""
    root = tmp_path_factory.mktemp("eval-cli")
    base = tiny_llama(vocab_size=len(VOCAB))
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    task, generic = tiny_models(base)
    task.save_pretrained(root / "task")
    generic.save_pretrained(root / "generic")
    columns = [("duration_ms", "float"), ("error", "boolean")]
    questions = ["How many errors?", "Slowest spans?", "P99 latency?", "Errors by host?"]
    records = [
        {"id": f"test-{i}", "prompt": format_prompt(q, columns), "completion": '{"calculations":[]}'}
        for i, q in enumerate(questions)
    ]
    write_jsonl(root / "test.jsonl", records)
    chats = [  # the project never saw this format in eval before: chat records, answers in the last turn
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for q in questions
    ]
    write_jsonl(root / "chat.jsonl", chats)
    write_jsonl(root / "prompts.jsonl", [{"prompt": q} for q in questions])
    return root


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def cli_args(root, out_dir, test_file: str = "test.jsonl", validation_prompts: int = 0) -> list[str]:
    return [
        "--model",
        str(root / "base"),
        "--task-adapter",
        str(root / "task"),
        "--generic-heads",
        str(root / "generic"),
        "--test-file",
        str(root / test_file),
        "--num-prompts",
        "2",
        "--num-validation-prompts",
        str(validation_prompts),
        "--max-new-tokens",
        str(MAX_NEW),
        "--warmup",
        "1",
        "--out-dir",
        str(out_dir),
    ]


def test_cli_writes_the_report(saved, tmp_path, capsys):
    assert main(cli_args(saved, tmp_path, validation_prompts=2) + ["--scorer", "query"]) == 0
    written = read_json(tmp_path / "report.json")
    assert [r.identical for r in written.rows] == [2] * 6 and written.row("e").tuning
    assert written.settings["chat_template"] and written.settings["tree"] == "auto"
    assert written.row("c").tree_source == "calibrated" and written.row("a").quality["n"] == 2
    assert set(written.row("a").quality) == {"valid_json_rate", "exact_match", "n"}
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "(c)  task LoRA + joint task heads" in capsys.readouterr().out


def test_cli_reads_chat_records_the_way_training_does(saved, tmp_path):
    """A messages dataset: the prompt is every turn before the last assistant turn, that turn the reference."""
    assert main(cli_args(saved, tmp_path, "chat.jsonl")) == 0
    written = read_json(tmp_path / "report.json")
    assert written.row("a").quality["n"] == 2 and written.row("a").prompts[0].id == "chat-0"
    tokenizer = char_tokenizer()
    turns = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How many errors?"},
    ]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    task, _ = tiny_models(tiny_llama(vocab_size=len(VOCAB)))
    expected = generate(
        task, tokenizer(prompt, add_special_tokens=False).input_ids, MAX_NEW, speculative=False
    )
    assert written.row("a").prompts[0].tokens[: len(expected.tokens)] == expected.tokens


def test_cli_takes_prompts_only_files(saved, tmp_path):
    assert main(cli_args(saved, tmp_path, "prompts.jsonl")) == 0
    assert all(r.quality is None for r in read_json(tmp_path / "report.json").rows)  # nothing to score


def test_cli_runs_a_scorer_plug_in_from_a_file(saved, tmp_path):
    plugin = tmp_path / "my_scorer.py"
    plugin.write_text(
        "def length(outputs, examples):\n    return {'long': sum(len(o) > 3 for o in outputs) / len(outputs), 'n': len(outputs)}\n"
    )
    assert main(cli_args(saved, tmp_path) + ["--scorer", f"{plugin}:length"]) == 0
    assert set(read_json(tmp_path / "report.json").row("c").quality) == {"long", "n"}


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ('{"question": "hi"}\n', [], r"bad\.jsonl: missing field\(s\) \['prompt'\]"),
        (
            '{"prompt": "a"}\n{"prompt": 3}\n',
            [],
            r"bad\.jsonl: field 'prompt' must be text",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"content": "b"}]}\n',
            [],
            r"bad\.jsonl: field 'messages' of record 1 has a message without a role",
        ),
        ('{"prompt": "a"}\n', ["--scorer", "nosuch"], r"unknown scorer 'nosuch'"),
        ('{"prompt": "a"}\n', ["--num-validation-prompts", "1"], r"no validation prompts"),
    ],
)
def test_cli_names_bad_data(saved, tmp_path, capsys, content, extra, message):
    (saved / "bad.jsonl").write_text(content)
    assert main(cli_args(saved, tmp_path, "bad.jsonl") + extra) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), err


def test_cli_fails_when_a_speculative_row_differs(saved, tmp_path, capsys, monkeypatch):
    real_generate = run.generate

    def broken(model, prompt, *args, **kwargs):
        out = real_generate(model, prompt, *args, **kwargs)
        if kwargs.get("tree") is not None and model.config.num_heads == 3:  # the task heads, row (c)
            out.tokens[0] = (out.tokens[0] + 1) % len(VOCAB)
        return out

    monkeypatch.setattr(run, "generate", broken)
    assert main(cli_args(saved, tmp_path) + ["--tree", "4"]) == 1
    assert "differs from the greedy output of (a)" in capsys.readouterr().err
    assert read_json(tmp_path / "report.json").mismatches == {"c": ["test-0", "test-1"]}


def test_cli_reports_a_missing_test_file(saved, tmp_path, capsys):
    args = cli_args(saved, tmp_path)
    args[args.index("--test-file") + 1] = str(tmp_path / "missing.jsonl")
    assert main(args) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_the_lora_alone_is_scored_beside_the_task_model(tmp_path):
    """Its answers are its own plain greedy output, scored like row (a)'s; the table names the gap in points."""
    task, generic = tiny_models()
    alone = MedusaLoraModel.from_base(
        tiny_llama(vocab_size=len(VOCAB), seed=7), MedusaConfig(num_heads=1), LORA
    )
    test = examples(2)
    result = evaluate(
        task, generic, test, MAX_NEW, warmup=0, decode=decode, scorer=exact, progress=False, lora_alone=alone
    )
    joint, reference = result.quality_rows
    assert joint.quality == result.row("a").quality
    assert joint.texts == [p.text for p in result.row("a").prompts]
    assert reference.texts == [
        decode(generate(alone, e.prompt_ids, MAX_NEW, speculative=False).tokens) for e in test
    ]
    assert reference.texts != joint.texts  # another model: not a copy of row (a)
    table = format_quality_table(result)
    gap = 100 * (joint.quality["exact_match"] - reference.quality["exact_match"])
    assert "LoRA alone" in table and f"exact_match {gap:+.0f} points" in table
    assert read_json(write_json(result, tmp_path / "r.json")).quality_rows == result.quality_rows
    assert (plot(result, tmp_path / "r.png")).stat().st_size > 1000
    assert format_quality_table(evaluate(task, None, test, MAX_NEW, warmup=0, progress=False)) == ""


def test_cli_scores_the_lora_alone(saved, tmp_path, capsys):
    assert main(cli_args(saved, tmp_path) + ["--scorer", "query", "--lora-alone", str(saved / "task")]) == 0
    written = read_json(tmp_path / "report.json")
    assert [q.name for q in written.quality_rows] == ["joint heads + LoRA", "LoRA alone"]
    assert written.settings["lora_alone"] == str(saved / "task")
    assert "valid_json_rate" in capsys.readouterr().out.split("LoRA alone")[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--scorer", "none"], "needs a --scorer"), (["--scorer", "query"], "holds no LoRA adapter")],
)
def test_cli_refuses_a_lora_alone_it_cannot_score(saved, tmp_path, capsys, extra, message):
    lora_alone = saved / ("task" if "none" in extra else "generic")
    assert main(cli_args(saved, tmp_path) + extra + ["--lora-alone", str(lora_alone)]) == 2
    assert message in capsys.readouterr().err
