"""Training: config, data, losses, the loop in every mode, resume, checkpoints, the final model, distill."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import logging
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medusa_lora.cli.train import main as train_main
from medusa_lora.decoding import generate
from medusa_lora.errors import ConfigError
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.training import TrainConfig, load_config, loop, train
from medusa_lora.training.build import build_model
from medusa_lora.training.checkpoint import list_checkpoints
from medusa_lora.training.config import RANGES
from medusa_lora.training.data import IGNORE_INDEX, Encoder, load_training_data
from medusa_lora.training.distill import main as distill_main
from medusa_lora.training.losses import MedusaObjective, head_weight, predict
from medusa_lora.training.replay import ReplayCache, replay_heads, replay_loss

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_model(directory: Path) -> Path:
    """A character-level ChatML tokenizer and a random 2-layer Llama with tied embeddings, saved together.

    The large init range lets the LM head's logits grow (its input is RMS-normed), so LoRA can learn fast.
    """
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def task_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 8)))
        rows.append({"prompt": f"reverse {word}", "completion": word[::-1] + " ok"})
    return rows


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    directory = make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    write_jsonl(directory / "train.jsonl", task_rows(32, 0))
    write_jsonl(directory / "validation.jsonl", task_rows(8, 1))
    return directory


def tiny_config(tiny: Path, out: Path, **overrides) -> TrainConfig:
    values = {
        "model": str(tiny),
        "train_file": str(tiny / "train.jsonl"),
        "validation_file": str(tiny / "validation.jsonl"),
        "output_dir": str(out),
        "max_length": 64,
        "batch_size": 4,
        "max_steps": 12,
        "log_every": 1,
        "lora_r": 4,
        "lora_alpha": 8,
        "lr_lora": 1e-2,
        "lr_heads": 1e-2,
        "warmup_ratio": 0.0,
        "num_heads": 3,
        "calibration_samples": 8,
        "tree_size": 8,
        "eval_batch_size": 3,
    }
    return TrainConfig(**{**values, **overrides})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        found.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return found


# ---------------------------------------------------------------- config
def test_unknown_config_key_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: x.jsonl\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*learning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set.*bogus"):
        load_config(None, ["train_file=x.jsonl", "bogus=1"])


def test_overrides_are_yaml_scalars_and_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: x.jsonl\nlr_heads: 1e-3\n")
    cfg = load_config(path, ["lora_target_modules=[q_proj, v_proj]", "max_steps=7", "lr_lora=2e-4", "seed=3"])
    assert (cfg.lr_heads, cfg.lr_lora, cfg.max_steps, cfg.seed) == (1e-3, 2e-4, 7, 3)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"run\.yaml.*mode"):
        load_config(path, ["mode=medusa"])
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        load_config(path, ["batch_size=two"])


def test_example_configs_load():
    configs = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "cpu-task.yaml",
        "cpu-generic-heads.yaml",
        "gpu-task.yaml",
        "gpu-generic-heads.yaml",
    }
    for path in configs:
        if "qlora" in path.name and importlib.util.find_spec("bitsandbytes") is None:
            continue  # load_in_4bit is refused without bitsandbytes (tests/test_memory.py skips it too)
        load_config(path)


# (key, value, accepted?): each rule's boundary from both sides
CONFIG_RULES = [
    ("lr_lora", -1, False),
    ("lr_lora", 0, False),
    ("lr_lora", 1e-9, True),
    ("lr_heads", 0, False),
    ("max_length", 1, False),
    ("max_length", 2, True),
    ("lora_r", 0, False),
    ("lora_alpha", 0, False),
    ("lora_dropout", -0.1, False),
    ("lora_dropout", 0.0, True),
    ("lora_dropout", 1.0, False),
    ("lora_last_layers", 0, False),
    ("lora_last_layers", None, True),
    ("max_train_samples", 0, False),
    ("num_heads", 0, False),
    ("num_head_layers", -1, False),
    ("num_head_layers", 0, True),
    ("head_loss_decay", -0.5, False),
    ("head_loss_decay", 1.0, True),
    ("head_loss_decay", 1.5, False),
    ("head_loss_weight", -0.1, False),
    ("head_loss_weight", 0.0, True),
    ("heads_warmup_steps", -1, False),
    ("heads_replay_epochs", -1, False),
    ("heads_replay_epochs", 0, True),
    ("heads_replay_steps", -1, False),
    ("heads_replay_batch_size", 0, False),
    ("lr_heads_replay", 0, False),
    ("draft_vocab_size", -1, False),
    ("weight_decay", -0.01, False),
    ("max_grad_norm", -1, False),
    ("max_grad_norm", 0, True),
    ("batch_size", 0, False),
    ("gradient_accumulation_steps", 0, False),
    ("max_steps", 0, False),
    ("max_steps", None, True),
    ("epochs", 0, False),
    ("warmup_ratio", 1.0, False),
    ("warmup_ratio", 0.0, True),
    ("seed", -1, False),
    ("seed", 2**32, False),
    ("seed", 0, True),
    ("save_every", -1, False),
    ("keep_checkpoints", 0, False),
    ("log_every", 0, False),
    ("calibration_samples", 0, False),
    ("eval_every", -1, False),
    ("early_stopping_patience", -1, False),
    ("tree_size", 0, False),
    ("eval_batch_size", 0, False),
]


@pytest.mark.parametrize(("key", "value", "accepted"), CONFIG_RULES)
def test_config_values_are_range_checked(key, value, accepted, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"train_file: x.jsonl\n{key}: {'null' if value is None else value}\n")
    if accepted:
        assert getattr(load_config(path), key) == value
        return
    shown = float(value) if isinstance(TrainConfig.__dataclass_fields__[key].default, float) else value
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: {key} must be .*, got {re.escape(str(shown))}$"
    ):
        load_config(path)


def test_every_numeric_setting_has_a_range_rule():
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, (int, float))}
    numeric -= {f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, bool)}
    optional = {"max_train_samples", "lora_last_layers", "max_steps"}  # default null
    assert numeric | optional == set(RANGES)
    assert {key for key, _, _ in CONFIG_RULES} == set(RANGES)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"mode": "lora"}, "heads_replay_epochs needs a mode that trains the heads, not 'lora'"),
        (
            {"head_targets": "distill"},
            "heads_replay_epochs replays the data's tokens .* head_targets: labels",
        ),
    ],
)
def test_heads_replay_is_refused_where_it_cannot_run(settings, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(train_file="x.jsonl", heads_replay_epochs=1, **settings)


def test_a_bad_override_is_blamed_on_set_not_on_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train_file: x.jsonl\nlr_heads: -1\n")
    with pytest.raises(ConfigError, match=r"^.*run\.yaml: lr_heads must be > 0, got -1\.0$"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set \(over .*run\.yaml\): lr_lora must be > 0, got -1\.0$"):
        load_config(path, ["lr_heads=1e-3", "lr_lora=-1"])


# ---------------------------------------------------------------- data
def test_prompt_tokens_are_the_generation_prompt(tiny):
    cfg = tiny_config(tiny, tiny / "unused")
    tokenizer = build_model(cfg).tokenizer
    data = load_training_data(cfg, tokenizer)
    row = task_rows(32, 0)[0]
    example = data.train.filter(
        lambda ids: tokenizer.decode(ids).startswith("<|im_start|>user\n" + row["prompt"] + "<"),
        input_columns="input_ids",
    )[0]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n:] == example["input_ids"][n:]
    assert tokenizer.decode(example["input_ids"][n:]) == row["completion"] + "<|im_end|>"
    batch = data.collator([data.train[0], data.train[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    padding = batch["attention_mask"] == 0
    assert padding.any() and batch["attention_mask"][:, 0].all()  # right padding
    assert (batch["labels"][padding] == IGNORE_INDEX).all()


def test_chat_records(tiny, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in task_rows(4, 0)
    ]
    cfg = tiny_config(tiny, tmp_path / "out", train_file=str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    tokenizer = build_model(cfg).tokenizer
    data = load_training_data(cfg, tokenizer)
    plain = Encoder(PromptFormat(tokenizer), 64)(
        task_rows(4, 0)[0]["prompt"], task_rows(4, 0)[0]["completion"]
    )
    assert plain["input_ids"] in data.train["input_ids"]


def test_truncation_is_counted_and_logged(tiny, tmp_path, caplog):
    rows = task_rows(6, 0) + [
        {"prompt": "p" * 40, "completion": "c" * 40},
        {"prompt": "p" * 80, "completion": "c"},
    ]
    cfg = tiny_config(tiny, tmp_path / "out", train_file=str(write_jsonl(tmp_path / "long.jsonl", rows)))
    with caplog.at_level(logging.WARNING):
        data = load_training_data(cfg, build_model(cfg).tokenizer)
    assert "2 of 8 examples exceed max_length=64: 1 had their completion cut, 1 were dropped" in caplog.text
    assert len(data.train) == 7 and max(len(ids) for ids in data.train["input_ids"]) == 64


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "a", "answer": "b"}\n', r"bad\.jsonl: missing field\(s\) \['completion'\]"),
        (
            '{"question": "a"}\n',
            r"bad\.jsonl: missing field\(s\) \['prompt', 'completion'\]",
        ),  # not "too few"
        ("", r"bad\.jsonl is empty"),
        ("\n\n", r"bad\.jsonl is empty"),
        ('{"prompt": "a", "completion": 3}\n', r"bad\.jsonl: field 'completion' must be text"),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n',
            r"bad\.jsonl: field 'completion' of record 1 is not text",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}]}\n',
            r"bad\.jsonl: field 'messages' of record 0 must end",
        ),
    ],
)
def test_bad_data_names_file_and_field(tiny, tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    cfg = tiny_config(tiny, tmp_path / "out", train_file=str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match=match):
        load_training_data(cfg, build_model(cfg).tokenizer)


# ---------------------------------------------------------------- losses
def test_losses_match_the_full_logits(tiny, tmp_path):
    """Gathering labelled positions gives the same losses as the full (K, B, T, V) computation."""
    cfg = tiny_config(tiny, tmp_path / "out")
    model = build_model(cfg)
    torch.nn.init.normal_(model.heads.blocks[1][0].linear.weight, std=0.1)
    data = load_training_data(cfg, model.tokenizer)
    batch = data.collator([data.train[i] for i in range(4)])
    parts = MedusaObjective(model, cfg)(**batch)
    out = model(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(
        parts.lm_loss, ce(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()), atol=1e-5
    )
    for k in range(cfg.num_heads):
        expected = ce(out.head_logits[k][:, : -(k + 2)].flatten(0, 1), labels[:, k + 2 :].flatten())
        assert torch.allclose(parts.head_losses[k], expected, atol=1e-5), k
    preds = predict(model, **batch, with_lm=True, with_heads=True)
    for k in range(cfg.num_heads):  # distill teachers: the LM rows that predict the same tokens
        assert torch.equal(preds.lm_targets[preds.teacher_rows[k]], preds.head_targets[k])


def test_head_weight_ramps_up():
    cfg = TrainConfig(train_file="x.jsonl", head_loss_weight=0.2, heads_warmup_steps=10)
    assert head_weight(0, cfg) == 0.0
    assert head_weight(5, cfg) == pytest.approx(0.1)
    assert head_weight(10, cfg) == head_weight(50, cfg) == pytest.approx(0.2)
    assert head_weight(0, TrainConfig(train_file="x.jsonl", mode="heads", heads_warmup_steps=10)) == 1.0


# ---------------------------------------------------------------- the loop
@pytest.fixture
def capture_model(monkeypatch):
    """The model instance ``train`` builds, to inspect its in-memory weights afterwards."""
    built: list[MedusaLoraModel] = []

    def build(cfg):
        built.append(build_model(cfg))
        return built[-1]

    monkeypatch.setattr(loop, "build_model", build)
    return built


@pytest.mark.parametrize(
    ("mode", "targets", "ratio"),
    [
        ("medusa-lora", "labels", 0.8),
        ("heads", "labels", 0.8),
        ("lora", "labels", 0.8),
        ("heads", "distill", 0.9),
    ],
)
def test_every_mode_learns_and_trains_only_its_parameters(
    tiny, tmp_path, capture_model, mode, targets, ratio
):
    cfg = tiny_config(
        tiny, tmp_path / "out", mode=mode, head_targets=targets, max_steps=24, heads_warmup_steps=4
    )
    model_dir = train(cfg)
    log = [r for r in records(tmp_path / "out") if "split" not in r]

    def drop(metric):  # mean of the last 4 steps relative to the first 4
        values = [metric(r) for r in log]
        return sum(values[-4:]) / sum(values[:4])

    if mode != "heads":
        assert drop(lambda r: r["lm_loss"]) < ratio
    if mode != "lora":
        assert drop(lambda r: sum(r["head_loss"])) < ratio
    if mode == "medusa-lora":
        assert [r["head_weight"] for r in log[:5]] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])

    model = capture_model[0]
    original = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in model.base.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(base[k], v) for k, v in original.items())  # the base never changes
    lora_b = [p for n, p in model.base.named_parameters() if "lora_B" in n]
    heads_changed = any(p.abs().sum() > 0 for p in model.heads.parameters())  # heads start at zero
    assert (len(lora_b) > 0 and all(p.abs().sum() > 0 for p in lora_b)) == (mode != "heads")
    assert heads_changed == (mode != "lora")
    assert (model_dir / "adapter_model.safetensors").is_file() == (mode != "heads")


def test_final_model_loads_and_generates(tiny, tmp_path):
    model_dir = train(tiny_config(tiny, tmp_path / "out"))
    calibration = json.loads((model_dir / "calibration.json").read_text())
    assert len(calibration["hit_rates"]) == 3 and len(calibration["hit_rates"][0]) == 10
    assert calibration["head_top1"][0] == calibration["hit_rates"][0][0]  # head 0: no heads before it
    model = MedusaLoraModel.from_pretrained(None, model_dir)
    assert model.has_lora and model.config.tree == calibration["tree"] and len(model.config.tree) == 7
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse abc"}], add_generation_prompt=True, tokenize=False
    )
    fast = generate(model, prompt, max_new_tokens=12)
    assert fast.tokens == generate(model, prompt, max_new_tokens=12, speculative=False).tokens
    with pytest.raises(ConfigError, match="earlier run"):
        train(tiny_config(tiny, tmp_path / "out"))


def test_gradient_checkpointing_gives_the_same_model(tiny, tmp_path):
    plain = tensors_of(train(tiny_config(tiny, tmp_path / "plain", max_steps=4)))
    checkpointed = tensors_of(
        train(tiny_config(tiny, tmp_path / "checkpointed", max_steps=4, gradient_checkpointing=True))
    )
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-5) for k in plain)


def test_a_bf16_base_trains_the_lora_and_heads_in_fp32(tiny, tmp_path, capture_model):
    model_dir = train(tiny_config(tiny, tmp_path / "out", max_steps=2, base_dtype="bfloat16"))
    model = capture_model[0]
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert {v.dtype for v in tensors_of(model_dir).values() if v.is_floating_point()} == {torch.float32}
    with pytest.raises(ConfigError, match="base_dtype must be one of"):
        tiny_config(tiny, tmp_path / "x", base_dtype="int8")


class Crash(Exception):
    pass


# heads replay over the last 5 steps' inputs: the checkpoint at step 6 carries steps 2-5, the resumed run adds
# 6-9 and drops 2-4, as the uninterrupted run did
REPLAY = {"heads_replay_epochs": 2, "heads_replay_steps": 5, "heads_replay_batch_size": 16}
VARIANTS = {
    "plain": {},
    "grouped": {"group_by_length": True},
    "replay": {**REPLAY, "path_conditioned_heads": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch, variant):
    settings = {"max_steps": 10, "gradient_accumulation_steps": 2, "save_every": 3, "lora_dropout": 0.1}
    settings.update(VARIANTS[variant])
    reference = tensors_of(train(tiny_config(tiny, tmp_path / "ref", **settings)))

    save = loop.save_checkpoint

    def save_then_crash(accelerator, output_dir, model, optimizer, scheduler, state, *rest):
        save(accelerator, output_dir, model, optimizer, scheduler, state, *rest)
        if state.step == 6:
            raise Crash

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(tiny_config(tiny, tmp_path / "run", **settings))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-3", "step-6"]
    resumed = tensors_of(train(tiny_config(tiny, tmp_path / "run", **settings), resume=True))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    steps = [r["step"] for r in records(tmp_path / "run") if "split" not in r]
    assert steps == list(range(1, 11))  # records after the checkpoint were replaced, not duplicated


def test_early_stopping_ends_training_when_held_out_top1_stops_improving(tiny, tmp_path):
    """A learning rate too small to move a weight: the second evaluation does not beat the first, so patience
    1 stops training there (not at max_steps), and the checkpoint written at the stop holds the counters."""
    cfg = tiny_config(
        tiny,
        tmp_path / "out",
        mode="heads",
        lr_heads=1e-30,
        eval_every=2,
        early_stopping_patience=1,
        save_every=100,
    )
    train(cfg)
    evaluations = [r for r in records(tmp_path / "out") if "score" in r]
    assert [r["step"] for r in evaluations] == [2, 4] and len(evaluations[0]["head_top1"]) == 3
    assert max(r["step"] for r in records(tmp_path / "out") if "split" not in r) == 4
    state = json.loads((list_checkpoints(tmp_path / "out")[-1] / "trainer_state.json").read_text())
    assert (state["step"], state["evals_without_improvement"]) == (4, 1)
    assert state["best_held_out"] == evaluations[0]["score"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_processes_match_one_with_the_same_global_batch(tiny, tmp_path, variant):
    """torchrun, 2 CPU processes (DDP over gloo) x batch 4 == 1 process x batch 4 x 2 accumulation steps; with
    heads replay, each process replays every process's cache in the single process's order."""
    settings = {"max_steps": 6, "save_every": 3, "lora_dropout": 0.0, **VARIANTS[variant]}
    single = tensors_of(train(tiny_config(tiny, tmp_path / "one", gradient_accumulation_steps=2, **settings)))
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny, tmp_path / "two", **settings).to_dict()))
    result = torchrun("-m", "medusa_lora.training", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "step-6").glob("rng-*")} == {
        "rng-0.safetensors",
        "rng-1.safetensors",
    }
    double = tensors_of(tmp_path / "two" / "model")
    assert single.keys() == double.keys()
    for key in single:
        assert torch.allclose(single[key], double[key], atol=1e-4), key
    losses = [[r["loss"] for r in records(tmp_path / run) if "split" not in r] for run in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``args`` (a script or ``-m module``, then its arguments) in 2 CPU processes (gloo)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


CRASH_AFTER_STEP_3 = """
import sys
from medusa_lora.cli.train import main
from medusa_lora.training import loop

save = loop.save_checkpoint

def save_then_crash(accelerator, output_dir, model, optimizer, scheduler, state, *rest):
    save(accelerator, output_dir, model, optimizer, scheduler, state, *rest)
    if state.step == 3:
        sys.exit(3)

loop.save_checkpoint = save_then_crash
sys.exit(main())
"""


@pytest.mark.slow
def test_fsdp_trains_resumes_and_saves_as_one_process(tiny, tmp_path):
    """torchrun, 2 CPU processes with FSDP2 (gloo) x batch 4 == 1 process x batch 4 x 2 accumulation steps, heads
    replay included (within 1e-4: the same sums in another order); a sharded run stopped after its step-3
    checkpoint and resumed is the uninterrupted one exactly; its model loads and generates losslessly."""
    settings = {"max_steps": 6, "save_every": 3, "lora_dropout": 0.0, **REPLAY}
    single = tensors_of(train(tiny_config(tiny, tmp_path / "one", gradient_accumulation_steps=2, **settings)))
    runs = {}
    for name in ("whole", "resumed"):
        runs[name] = tmp_path / f"{name}.yaml"
        runs[name].write_text(
            yaml.safe_dump(tiny_config(tiny, tmp_path / name, fsdp=True, **settings).to_dict())
        )
    whole = torchrun("-m", "medusa_lora.training", "--config", str(runs["whole"]))
    assert whole.returncode == 0, whole.stderr[-3000:]
    (tmp_path / "crash.py").write_text(CRASH_AFTER_STEP_3)
    crashed = torchrun(str(tmp_path / "crash.py"), "--config", str(runs["resumed"]))
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "model").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-3"]
    checkpoint = {p.name for p in list_checkpoints(tmp_path / "resumed")[0].iterdir()}
    assert {f"{kind}-{rank}.safetensors" for kind in ("rng", "replay") for rank in (0, 1)} <= checkpoint
    assert {Path(name).suffix for name in checkpoint} == {".safetensors", ".json"}
    resumed = torchrun("-m", "medusa_lora.training", "--config", str(runs["resumed"]), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    sharded, continued = tensors_of(tmp_path / "whole" / "model"), tensors_of(tmp_path / "resumed" / "model")
    assert single.keys() == sharded.keys() == continued.keys()
    for key in single:
        assert torch.allclose(single[key], sharded[key], atol=1e-4), key
        assert torch.equal(sharded[key], continued[key]), key
    losses = [[r["loss"] for r in records(tmp_path / run) if "split" not in r] for run in ("one", "resumed")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    model = MedusaLoraModel.from_pretrained(None, tmp_path / "resumed" / "model")
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse abc"}], add_generation_prompt=True, tokenize=False
    )
    fast = generate(model, prompt, max_new_tokens=8)
    assert fast.tokens == generate(model, prompt, max_new_tokens=8, speculative=False).tokens


def test_checkpoints_hold_no_pickle(tiny, tmp_path):
    train(tiny_config(tiny, tmp_path / "out", max_steps=4, save_every=2, keep_checkpoints=1, **REPLAY))
    (checkpoint,) = list_checkpoints(tmp_path / "out")
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    assert "replay-0.safetensors" in {p.name for p in files}
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    for path in files:
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path  # pickle / torch.save zip
    for path in checkpoint.glob("*.json"):
        json.loads(path.read_text())


def test_cli(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    assert "--resume" in capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(f"model: {tiny}\ntrain_file: {tmp_path / 'missing.jsonl'}\n")
    assert train_main(["--config", str(tmp_path / "run.yaml")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- distill
def test_distill_writes_prompt_completion_records(tiny, tmp_path):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "reverse abc", "id": "a"},
            {"prompt": "hi", "id": "b"},
            {"prompt": "reverse abcdef", "id": "c"},
        ],
    )
    out = tmp_path / "distilled.jsonl"
    assert (
        distill_main(
            [
                "--model",
                str(tiny),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--max-new-tokens",
                "6",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and all(isinstance(r["completion"], str) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = build_model(tiny_config(tiny, tmp_path)).tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert rows[1]["completion"] == tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    assert (
        distill_main(["--model", str(tiny), "--prompts", str(tmp_path / "none.jsonl"), "--out", str(out)])
        == 2
    )
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text('{"question": "hi"}\n')
    assert distill_main(["--model", str(tiny), "--prompts", str(no_prompt), "--out", str(out)]) == 2


def test_draft_vocabulary_is_the_frequent_label_tokens(tiny, tmp_path):
    from medusa_lora.training.data import load_training_data

    model_dir = train(tiny_config(tiny, tmp_path / "out", draft_vocab_size=6, max_steps=4))
    model = MedusaLoraModel.from_pretrained(None, model_dir)
    vocab = model.heads.draft_vocab.tolist()
    assert len(vocab) == model.config.draft_vocab_size == 6
    data = load_training_data(tiny_config(tiny, tmp_path / "other"), model.tokenizer)
    counts: dict[int, int] = {}
    for labels in data.train["labels"]:
        for token in labels:
            if token != -100:
                counts[token] = counts.get(token, 0) + 1
    sixth = sorted(counts.values(), reverse=True)[5]
    assert all(counts.get(t, 0) >= sixth for t in vocab)  # the six most frequent (ties aside)
    calibration = json.loads((model_dir / "calibration.json").read_text())
    assert all(0 <= rate <= 1 for rates in calibration["hit_rates"] for rate in rates)
    out = generate(model, [1, 2, 3, 4], max_new_tokens=10)
    assert out.tokens == generate(model, [1, 2, 3, 4], max_new_tokens=10, speculative=False).tokens


def cached_head_inputs(tiny, tmp_path, **settings):
    cfg = tiny_config(tiny, tmp_path / "out", heads_replay_epochs=1, **settings)
    model = build_model(cfg)
    data = load_training_data(cfg, model.tokenizer)
    objective = MedusaObjective(model, cfg)
    cache = ReplayCache(window=0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=4, collate_fn=data.collator)
    for step, batch in enumerate(loader):
        cache.add(step, objective(**batch).head_inputs)
    return cfg, model, cache


def test_replay_cache_keeps_the_window_and_round_trips_through_tensors(tiny, tmp_path):
    _, _, full = cached_head_inputs(tiny, tmp_path, path_conditioned_heads=True)
    inputs, steps = full.joined()
    assert inputs.hidden.shape == (len(full), 32) and not inputs.hidden.requires_grad
    assert inputs.path_ids.shape == (len(full), 2) and inputs.targets.shape == (len(full), 3)
    assert steps.tolist() == sorted(steps.tolist()) and steps.unique().numel() == 8
    labelled = inputs.targets != IGNORE_INDEX
    assert labelled.any(1).all() and not labelled.all()  # some head has a target at every cached position
    window = ReplayCache(window=3)
    for step, entry in full.entries:
        window.add(step, entry)
    assert [step for step, _ in window.entries] == [5, 6, 7]
    restored = ReplayCache(window=3)
    restored.load_state_dict(window.state_dict(), torch.device("cpu"))
    (a, a_steps), (b, b_steps) = window.joined(), restored.joined()
    assert torch.equal(a_steps, b_steps)
    assert all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("hidden", "next_ids", "path_ids", "targets")
    )


@pytest.mark.parametrize("path_conditioned", [False, True])
def test_heads_replay_lowers_the_heads_loss_on_the_cache_and_trains_only_the_heads(
    tiny, tmp_path, path_conditioned
):
    cfg, model, cache = cached_head_inputs(
        tiny,
        tmp_path,
        path_conditioned_heads=path_conditioned,
        heads_replay_batch_size=32,
        lr_heads_replay=1e-2,
    )
    cfg.heads_replay_epochs = 8
    inputs, _ = cache.joined()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        start = replay_loss(model, inputs, cfg)[0].item()
    records = replay_heads(model, inputs, cfg, show_progress=False)
    with torch.no_grad():
        end, hits, counts = replay_loss(model, inputs, cfg)
    assert [r["epoch"] for r in records] == list(range(1, 9)) and records[-1]["loss"] < records[0]["loss"]
    assert end.item() < 0.8 * start
    assert counts.tolist() == (inputs.targets != IGNORE_INDEX).sum(0).tolist() and (hits <= counts).all()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("heads.") for n in changed)


def test_heads_replay_reads_hidden_states_cached_under_bf16_autocast(tiny, tmp_path):
    cfg, model, cache = cached_head_inputs(tiny, tmp_path, path_conditioned_heads=True)
    inputs, _ = cache.joined()
    inputs.hidden = inputs.hidden.bfloat16()  # what a step under bf16 autocast may leave in the cache
    before = [p.detach().clone() for p in model.heads.parameters()]
    records = replay_heads(
        model, inputs, cfg, lambda: torch.autocast("cpu", dtype=torch.bfloat16), show_progress=False
    )
    assert len(records) == 1 and records[0]["loss"] > 0
    assert all(p.dtype == torch.float32 for p in model.heads.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.heads.parameters()))


def test_length_grouped_batches_cut_padding_and_keep_a_random_order():
    from medusa_lora.training.data import LengthGroupedBatches

    rng = random.Random(0)
    lengths = [rng.randrange(100, 400) for _ in range(803)]
    batches = list(LengthGroupedBatches(lengths, 4, seed=1))
    assert len(batches) == len(LengthGroupedBatches(lengths, 4, seed=1)) == 201
    assert sorted(i for batch in batches for i in batch) == list(range(803))  # every example once
    assert batches == list(LengthGroupedBatches(lengths, 4, seed=1))  # the seed fixes the order (resume)
    assert batches != list(LengthGroupedBatches(lengths, 4, seed=2))

    def padding(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths) - 1

    shuffled = torch.randperm(803, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(batches) < 0.05 and padding([shuffled[i : i + 4] for i in range(0, 803, 4)]) > 0.15
    longest = [max(lengths[i] for i in b) for b in batches[:50]]
    assert longest != sorted(longest, reverse=True)  # not a sweep from long to short
    assert sum(a < b for a, b in itertools.pairwise(longest)) > 15  # long and short batches alternate


# ---------------------------------------------------------------- calibration
def calibration_rows(vocab: int, avoid: int | None = None, n: int = 6, prompt: int = 5, completion: int = 9):
    """Random token rows with the prompt unlabelled; ``avoid`` never appears (so labels can't be it)."""
    rng = random.Random(0)
    tokens = [t for t in range(vocab) if t != avoid]
    rows = []
    for _ in range(n):
        ids = [rng.choice(tokens) for _ in range(prompt + completion)]
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * prompt + ids[prompt:],
            }
        )
    return rows


def stack_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def test_calibration_measures_hit_rates_against_the_models_greedy_tokens():
    import datasets

    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.training.calibrate import calibrate

    from conftest import TINY_VOCAB, tiny_llama

    base = tiny_llama(seed=5)
    favourite = 7  # the model's argmax everywhere, and never a label
    head = torch.nn.Linear(base.config.hidden_size, TINY_VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(base.lm_head.weight)
        head.bias.zero_()
        head.bias[favourite] = 50.0
    base.lm_head = head
    model = MedusaLoraModel.from_base(
        base, MedusaConfig(num_heads=3)
    )  # identity heads: they draft `favourite`
    rows = calibration_rows(TINY_VOCAB, avoid=favourite)
    result = calibrate(model, datasets.Dataset.from_list(rows), stack_rows, batch_size=4, tree_size=4)
    assert result.lm_top1 == 0.0  # the greedy token is never the data's token...
    assert result.head_top1 == [1.0, 1.0, 1.0]  # ...but it is what verification accepts
    assert result.targets == "greedy" and result.tree == [[0], [0, 0], [0, 0, 0]]
    assert result.expected_accepted_length == pytest.approx(4.0)


@pytest.mark.parametrize("conditioning", ["none", "path"])
def test_calibration_walk_predicts_the_tokens_per_step_generation_realises(conditioning):
    """On completions that are the model's own greedy output, walking generation over the calibration's greedy
    ranks gives exactly the tokens per step ``generate()`` realises, for any tree."""
    import datasets

    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.training.calibrate import calibrate
    from medusa_lora.trees.tree import TokenTree, calibrated_tree, chain_tree
    from medusa_lora.trees.walk import expected_accepted_length, walked_accepted_length

    from conftest import TINY_VOCAB, randomize_heads, tiny_llama

    base = tiny_llama(seed=6)
    base.lm_head.bias = torch.nn.Parameter(torch.zeros(TINY_VOCAB))
    with torch.no_grad():
        base.lm_head.bias[7] = 4.0  # the heads share the LM head: they often draft 7, often the greedy token
    model = MedusaLoraModel.from_base(
        base, MedusaConfig(num_heads=3, path_conditioned=conditioning == "path")
    )
    randomize_heads(model, seed=1)
    rng = random.Random(3)
    prompts = [[rng.randrange(TINY_VOCAB) for _ in range(5)] for _ in range(8)]
    rows = []
    for prompt in prompts:
        completion = generate(model, prompt, max_new_tokens=14, speculative=False, eos_token_id=[]).tokens
        ids = prompt + completion
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * 5 + completion}
        )
    result = calibrate(model, datasets.Dataset.from_list(rows), stack_rows, batch_size=3, tree_size=5)
    assert len(result.greedy_ranks) == len(prompts)
    assert all(len(words.split(" ")) == 14 for words in result.greedy_ranks)  # one word per completion token
    trees = [chain_tree(1), chain_tree(3), TokenTree([(0,), (1,), (0, 0), (1, 0)])]
    trees += [calibrated_tree(result.hit_rates, size) for size in (3, 5, 8)]
    walked_differs = False
    for tree in trees:
        steps = [
            generate(model, prompt, max_new_tokens=14, tree=tree, eos_token_id=[]).stats.accepted_lengths
            for prompt in prompts
        ]
        realised = sum(map(sum, steps)) / sum(map(len, steps))
        assert walked_accepted_length(tree, result.greedy_ranks) == pytest.approx(realised)
        walked_differs |= abs(expected_accepted_length(tree, result.hit_rates) - realised) > 0.05
    assert walked_differs  # the hit rates' expectation is not what is realised: the walk is
    assert 1.3 < result.expected_accepted_length < 4  # the heads are right some of the time, not always


def test_walked_accepted_length_follows_generation_step_by_step():
    from medusa_lora.trees.tree import TokenTree
    from medusa_lora.trees.walk import walked_accepted_length

    tree = TokenTree([(0,), (1,), (0, 0)])
    # 7 tokens; roots at 0 (accepts (0, 0): 3 tokens), 3 (accepts (0,): 2), 5 (a miss: 1); 6 is the last token
    assert walked_accepted_length(tree, ["00 9 2 0 1  "]) == pytest.approx(6 / 3)
    assert walked_accepted_length(tree, ["000 000 000 000 000"]) == pytest.approx(4 / 2)  # capped at the end
    assert walked_accepted_length(tree, ["1 2 1 2"]) == pytest.approx(
        3 / 2
    )  # (1,) at 0, (1,) at 2 capped at the end
    assert walked_accepted_length(tree, ["0"]) == 1.0  # one token: no step


@pytest.mark.parametrize("conditioning", ["root", "path"])
def test_conditioned_heads_train_and_generate_losslessly(tiny, tmp_path, conditioning):
    model_dir = train(tiny_config(tiny, tmp_path / "out", **{f"{conditioning}_conditioned_heads": True}))
    weights = load_file(model_dir / "medusa_heads.safetensors")
    trained = ["root_proj.weight"] + (
        ["path_proj.0.weight", "path_proj.1.weight"] if conditioning == "path" else []
    )
    assert sorted(k for k in weights if "_proj" in k) == sorted(trained)
    assert all(weights[name].abs().sum() > 0 for name in trained)
    model = MedusaLoraModel.from_pretrained(None, model_dir)
    assert getattr(model.config, f"{conditioning}_conditioned") and model.heads.root_proj is not None
    prompt = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "reverse abc"}], add_generation_prompt=True, tokenize=False
    )
    fast = generate(model, prompt, max_new_tokens=12)
    assert fast.tokens == generate(model, prompt, max_new_tokens=12, speculative=False).tokens


@pytest.mark.parametrize("conditioning", ["none", "root", "path"])
def test_calibration_aligns_head_k_with_the_argmax_before_its_token(conditioning):
    """Head k at position t against the argmax at t + k + 1, at the positions generation drafts from (token
    t + 1 is a completion token); conditioned heads see token t + 1, and path-conditioned heads then their own
    top-1 drafts, as ``model.forward`` and generation give them."""
    import datasets

    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.training.calibrate import TOP_K, calibrate

    from conftest import TINY_VOCAB, randomize_heads, tiny_llama

    base = tiny_llama(seed=6)
    base.lm_head.bias = torch.nn.Parameter(torch.zeros(TINY_VOCAB))
    with torch.no_grad():
        base.lm_head.bias[7] = 4.0  # token 7 is often the argmax, and often drafted: heads are often right
    model = MedusaLoraModel.from_base(
        base,
        MedusaConfig(
            num_heads=3, root_conditioned=conditioning == "root", path_conditioned=conditioning == "path"
        ),
    )
    randomize_heads(model, seed=1)
    rows = calibration_rows(TINY_VOCAB, n=7)
    result = calibrate(model, datasets.Dataset.from_list(rows), stack_rows, batch_size=3, tree_size=8)

    # hit rates: given heads 0..k-1 were right at top-1 at the same position; head_top1: everywhere
    hits, label_hits, counts = torch.zeros(3, TOP_K), torch.zeros(3, TOP_K), torch.zeros(3)
    top1, everywhere = torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for row in rows:
            out = model(torch.tensor([row["input_ids"]]))
            greedy = out.logits[0].argmax(-1)
            labels = row["labels"]
            for t in range(len(labels)):
                right_so_far = True
                for k in range(3):
                    if t + k + 2 >= len(labels) or IGNORE_INDEX in (labels[t + 1], labels[t + k + 2]):
                        break  # generation drafts after t + 1
                    scores = out.head_logits[k, 0, t]
                    rank = int((scores > scores[greedy[t + k + 1]]).sum())
                    everywhere[k] += 1
                    top1[k] += rank == 0
                    if right_so_far:
                        counts[k] += 1
                        label_rank = int((scores > scores[labels[t + k + 2]]).sum())
                        for r, table in ((rank, hits), (label_rank, label_hits)):
                            if r < TOP_K:
                                table[k, r] += 1
                    right_so_far = right_so_far and rank == 0
    assert counts[2] >= 5 and counts[2] < counts[1] < counts[0]  # the condition bites, and leaves samples
    assert result.tokens == counts.int().tolist()
    torch.testing.assert_close(torch.tensor(result.hit_rates), hits / counts[:, None])
    torch.testing.assert_close(torch.tensor(result.head_top1), top1 / everywhere)
    assert not torch.allclose(torch.tensor(result.hit_rates), label_hits / counts[:, None])
