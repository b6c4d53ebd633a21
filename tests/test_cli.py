"""The console command: every subcommand answers --help, and generate runs on the demo model."""

from __future__ import annotations

import errno
import os
import re

import pytest

from medusa_lora import decoding
from medusa_lora.cli import SUBCOMMANDS, main
from medusa_lora.cli import generate as generate_cli
from medusa_lora.prompting import PromptFormat


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    assert main([]) == 2


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"medusa-lora {command}" in capsys.readouterr().out


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_prints_text_and_stats(demo_dir, capsys):
    assert main(["generate", "--model", str(demo_dir), "--max-new-tokens", "8", "What is 2+2?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "tok/s" in captured.err and "tokens/step" in captured.err


# ---------------------------------------------------------------- errors: `error: ...` and exit code 2
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_training import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def test_generate_on_int4_weights_matches_plain_decoding_on_them(tiny_dir, capsys):
    """``--weights int4``: the tree's output equals plain decoding on the same quantized weights."""
    args = [
        "generate",
        "--model",
        str(tiny_dir),
        "--weights",
        "int4",
        "--max-new-tokens",
        "12",
        "--raw",
        "ab",
    ]
    assert main([*args, "--tree", "8"]) == 0
    speculative = capsys.readouterr().out
    assert main([*args, "--no-speculation"]) == 0
    assert capsys.readouterr().out == speculative


BAD_INPUTS = [
    (["generate", "--adapter", "{tmp}/missing", "hi"], r"missing/medusa_config\.json is missing"),
    (["generate", "--model", "{tiny}", "--max-new-tokens", "0", "hi"], r"max_new_tokens must be >= 1, got 0"),
    (
        ["export", "{tmp}/missing", "--format", "tgi", "--out", "{tmp}/out"],
        r"missing/medusa_config\.json is missing",
    ),
    (["import", "{tmp}/missing", "--out", "{tmp}/out"], r"missing/config\.json is missing"),
    (
        ["train", "--set", "train_file=x.jsonl", "--set", "lr_lora=-1"],
        r"--set: lr_lora must be > 0, got -1\.0",
    ),
    (["train", "--config", "{tmp}/missing.yaml"], r"cannot read config .*missing\.yaml"),
    (
        ["distill", "--prompts", "{tmp}/missing.jsonl", "--out", "{tmp}/out.jsonl"],
        r"missing\.jsonl does not exist",
    ),
    (
        ["eval", "--model", "{tiny}", "--task-adapter", "{tmp}/missing", "--test-file", "{tmp}/test.jsonl"],
        r"missing/medusa_config\.json is missing",
    ),
]


@pytest.mark.parametrize("tree", ["0", "-3", "big", "1.5"])
def test_a_bad_tree_option_is_refused_before_any_model_loads(tree, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--tree", tree, "hi"])
    assert exit_info.value.code == 2
    assert (
        "error: argument --tree: tree must be a node count >= 1, 'auto' or 'calibrated'"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_unknown_weight_width_is_refused_before_any_model_loads(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [command, "--weights", "int3", *(["hi"] if command == "generate" else ["--test-file", "x.jsonl"])]
        )
    assert exit_info.value.code == 2
    assert "error: argument --weights: invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a[:2]) for a, _ in BAD_INPUTS])
def test_bad_input_is_an_error_line_and_exit_code_2(argv, message, tmp_path, tiny_dir, capsys):
    argv = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: .*{message}", err, re.MULTILINE), err
    assert "Traceback" not in err


def test_os_errors_name_the_file(monkeypatch, capsys):
    def missing_file(argv):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "prompts.jsonl")

    monkeypatch.setattr(generate_cli, "main", missing_file)
    assert main(["generate", "hi"]) == 2
    assert capsys.readouterr().err == "error: No such file or directory: prompts.jsonl\n"


# ---------------------------------------------------------------- generate: the prompt contract
class _Captured(Exception):
    pass


@pytest.mark.parametrize("raw", [False, True])
def test_generate_uses_the_prompt_contract(raw, tiny_dir, monkeypatch):
    """The prompt is PromptFormat's encoding; generation stops at the end of the assistant turn."""
    seen = {}

    def fake_generate(model, prompt, **kwargs):
        seen.update(prompt=prompt, eos=kwargs["eos_token_id"], tokenizer=model.tokenizer)
        raise _Captured

    monkeypatch.setattr(decoding, "generate", fake_generate)
    with pytest.raises(_Captured):
        main(["generate", "--model", str(tiny_dir), "What is 2+2?"] + (["--raw"] if raw else []))
    tokenizer = seen["tokenizer"]
    assert seen["prompt"] == PromptFormat(tokenizer, use_chat_template=not raw).encode("What is 2+2?")
    text = tokenizer.decode(seen["prompt"])
    assert text.startswith("<|im_start|>user") != raw and text.endswith("assistant\n") != raw
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in seen["eos"]
