"""The eval runner: rows a-d on a tiny random Llama, the identity check, report.json/png and the CLI."""

from __future__ import annotations

import copy
import json
import string

import pytest
import torch
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from medusa_lora.config import MedusaConfig
from medusa_lora.errors import ConfigError
from medusa_lora.eval import run
from medusa_lora.eval.__main__ import main
from medusa_lora.eval.report import format_table, plot, read_json, write_json
from medusa_lora.eval.run import EvalExample, evaluate, with_generic_heads
from medusa_lora.eval.task_data import format_prompt
from medusa_lora.generation import generate
from medusa_lora.model import MedusaLoraModel

from conftest import tiny_llama

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
VOCAB = ["<unk>", "<eos>", "\n", *string.printable[:95]]  # one token per character
TASK_TREE = [[0], [1], [0, 0]]
MAX_NEW = 12


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a tiny chat template, so the CLI runs without downloads."""
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(VOCAB)}, [], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def tiny_models(base=None) -> tuple[MedusaLoraModel, MedusaLoraModel]:
    """A task model (LoRA + 3 heads + calibrated tree) and generic 2-head heads, on the same base weights."""
    base = base if base is not None else tiny_llama(vocab_size=len(VOCAB))
    task = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=3), LORA)
    task.config.tree = TASK_TREE
    generic = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=2))
    return task, generic


def examples(n: int = 3) -> list[EvalExample]:
    gen = torch.Generator().manual_seed(0)
    return [
        EvalExample(f"test-{i}", torch.randint(3, len(VOCAB), (10,), generator=gen).tolist(), "{}", {})
        for i in range(n)
    ]


def break_task_heads(monkeypatch: pytest.MonkeyPatch, task: MedusaLoraModel) -> None:
    """Make row (c) (drafted by the task heads) emit a wrong last token."""

    def broken(model, prompt, *args, **kwargs):
        out = generate(model, prompt, *args, **kwargs)
        if kwargs["speculative"] and model.heads is task.heads:
            out.tokens[-1] = (out.tokens[-1] + 1) % len(VOCAB)
        return out

    monkeypatch.setattr(run, "generate", broken)


@pytest.fixture(scope="module")
def report():
    task, generic = tiny_models()
    decode = lambda tokens: "".join(VOCAB[i] for i in tokens)
    return evaluate(task, generic, examples(), MAX_NEW, warmup=1, decode=decode, progress=False)


def test_rows_a_to_d_have_every_field(report):
    assert [r.key for r in report.rows] == ["a", "b", "c", "d"]
    for row in report.rows:
        assert len(row.prompts) == 3 and row.tokens_per_s > 0 and row.speedup > 0
        assert all(p.new_tokens == MAX_NEW == len(p.tokens) and p.wall_time_s > 0 for p in row.prompts)
        assert row.quality == {"valid_json_rate": 0.0, "exact_match": 0.0, "n": 3}
    a, b, c, d = report.rows
    assert a.speedup == 1.0 and a.mean_accepted_length == 1.0 and not a.lossless
    assert b.lossless and c.lossless and not d.lossless
    assert b.mean_accepted_length >= 1.0 and c.mean_accepted_length >= 1.0 and d.mean_accepted_length is None
    assert (b.tree_source, b.tree_size) == ("default", 16)
    assert (c.tree_source, c.tree_size) == ("calibrated", len(TASK_TREE) + 1)
    assert sum(k * v for k, v in c.accepted_length_histogram.items()) == sum(MAX_NEW - 1 for _ in c.prompts)
    assert {"torch", "transformers", "cpu", "gpu", "dtype", "date"} <= set(report.environment)


def test_speculative_rows_are_identical_to_a(report):
    assert [r.identical for r in report.rows[:3]] == [3, 3, 3]
    assert report.mismatches == {}


def test_report_json_round_trips_and_png_is_written(report, tmp_path):
    path = write_json(report, tmp_path / "report.json")
    assert read_json(path) == report
    assert json.loads(path.read_text())["rows"][2]["prompts"][0]["accepted_lengths"]
    png = plot(report, tmp_path / "report.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    table = format_table(report).splitlines()
    assert len(table) == 2 + 4 and table[0].split()[:3] == ["row", "setup", "tok/s"]
    assert "3/3 100%" in table[4] and "n/a" in table[5]


def test_a_speculative_row_that_differs_is_flagged(monkeypatch):
    task, generic = tiny_models()
    break_task_heads(monkeypatch, task)
    broken = evaluate(task, generic, examples(2), MAX_NEW, warmup=0, progress=False)
    assert broken.mismatches == {"c": ["test-0", "test-1"]}
    assert broken.row("c").identical == 0 and broken.row("b").identical == 2
    assert broken.row("c").quality is None


def test_generic_heads_must_be_heads_only():
    task, _ = tiny_models()
    with pytest.raises(ConfigError, match="heads-only"):
        with_generic_heads(task, task)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Base dir (with tokenizer), task and generic dirs and a task test file, as the CLI reads them."""
    root = tmp_path_factory.mktemp("eval-cli")
    base = tiny_llama(vocab_size=len(VOCAB))
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    task, generic = tiny_models(base)
    task.save_pretrained(root / "task")
    generic.save_pretrained(root / "generic")
    columns = [("duration_ms", "float"), ("error", "boolean")]
    records = [
        {"id": f"test-{i}", "prompt": format_prompt(q, columns), "completion": '{"calculations":[]}'}
        for i, q in enumerate(["How many errors?", "Slowest spans?", "P99 latency?"])
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def cli_args(root, out_dir) -> list[str]:
    return [
        "--model",
        str(root / "base"),
        "--task-adapter",
        str(root / "task"),
        "--generic-heads",
        str(root / "generic"),
        "--test-file",
        str(root / "test.jsonl"),
        "--num-prompts",
        "2",
        "--max-new-tokens",
        str(MAX_NEW),
        "--warmup",
        "1",
        "--out-dir",
        str(out_dir),
    ]


def test_cli_writes_the_report(saved, tmp_path, capsys):
    assert main(cli_args(saved, tmp_path)) == 0
    written = read_json(tmp_path / "report.json")
    assert [r.identical for r in written.rows][:3] == [2, 2, 2]
    assert written.settings["chat_template"] and written.settings["tree"] == "auto"
    assert written.row("c").tree_source == "calibrated" and written.row("a").quality["n"] == 2
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "(c)  task LoRA + joint task heads" in capsys.readouterr().out


def test_cli_fails_when_a_speculative_row_differs(saved, tmp_path, capsys, monkeypatch):
    real_generate = run.generate

    def broken(model, prompt, *args, **kwargs):
        out = real_generate(model, prompt, *args, **kwargs)
        if kwargs["speculative"] and model.config.num_heads == 3:  # the task heads, row (c)
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
