"""The trainer's memory estimate: against the measured peak of a real training step on tiny models, and its
arithmetic for an 8B Llama (Llama-3.1-8B's dimensions, built in code) and the configs written for one."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from test_training import make_tiny_model, tiny_config, write_jsonl
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig

from medusa_lora.training.config import load_config
from medusa_lora.training.loop import Trainer
from medusa_lora.training.memory import GIB, estimate_memory

CONFIGS = Path(__file__).parents[1] / "training" / "configs"
# Llama-3.1-8B's config.json, the fields that size it (8.03e9 parameters)
LLAMA_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
# estimate / measured: the estimate is of the most a batch can hold (every sequence max_length long), so the
# rows below fill it. Measured on a CPU (SDPA's math backend): from 0.89 (checkpointing) to 1.34 (lora, fp32), and on
# a 4-bit base within the same bounds
TOLERANCE = (0.7, 1.4)
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA configs need bitsandbytes"
)


@pytest.fixture(scope="module")
def full_rows(tmp_path_factory) -> Path:
    """The tiny model with rows whose completions fill ``max_length`` (cut), so every batch is full."""
    directory = make_tiny_model(tmp_path_factory.mktemp("memory-model"))
    rng = random.Random(0)
    rows = [{"prompt": "r", "completion": "".join(rng.choices("abcdefgh ", k=300))} for _ in range(8)]
    write_jsonl(directory / "train.jsonl", rows)
    write_jsonl(directory / "validation.jsonl", rows[:2])
    return directory


def peak_bytes(trainer: Trainer) -> int:
    """The most bytes of CPU tensors live during ``trainer.fit()``: the model's parameters and buffers, plus the
    running sum of the allocations and frees the profiler records (activations, gradients, AdamW's moments)."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in trainer.model.state_dict().values()
    }
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.fit()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return sum(storages.values()) + peak


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["lora", "heads", "medusa-lora"])
def test_the_estimate_is_the_measured_peak_of_a_training_step(
    full_rows, tmp_path, capsys, mode, checkpointing, precision
):
    check_estimate(full_rows, tmp_path, capsys, mode, checkpointing, precision)


@needs_bitsandbytes
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mode", ["lora", "medusa-lora"])
def test_the_estimate_is_the_measured_peak_on_a_4bit_base(
    full_rows, tmp_path, capsys, mode, checkpointing, precision
):
    check_estimate(
        full_rows,
        tmp_path,
        capsys,
        mode,
        checkpointing,
        precision,
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
    )


def check_estimate(
    model_dir: Path, tmp_path: Path, capsys, mode: str, checkpointing: bool, precision: str, **settings
) -> None:
    """One optimizer step's measured peak is within ``TOLERANCE`` of the estimate, which the trainer printed."""
    cfg = tiny_config(
        model_dir,
        tmp_path / "out",
        mode=mode,
        gradient_checkpointing=checkpointing,
        mixed_precision=precision,
        max_length=128,
        max_steps=1,
        **settings,
    )
    AcceleratorState._reset_state(reset_partial_state=True)  # each test its own mixed precision
    trainer = Trainer(cfg, resume=False)
    measured = peak_bytes(trainer)
    estimate = estimate_memory(
        trainer.model.causal_lm.config, cfg, precision, math_attention=True
    )  # on a CPU
    assert TOLERANCE[0] <= estimate.total / measured <= TOLERANCE[1], (estimate, measured)
    printed = re.findall(r"^memory estimate: (.*)$", capsys.readouterr().out, re.MULTILINE)
    assert printed == [str(estimate)]  # once, before the step, what was computed here


@needs_bitsandbytes
def test_an_8b_qlora_fits_one_24_gib_gpu():
    cfg = load_config(CONFIGS / "gpu-8b-qlora.yaml")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    estimate = estimate_memory(LLAMA_8B, cfg, "bf16")
    assert estimate.total < 24 * GIB
    # the 4-bit linears (6.98e9 weights at 0.52 bytes) and the float32 embeddings and LM head (1.05e9)
    assert estimate.base == pytest.approx(6.98e9 * 0.5159 + 1.05e9 * 4, rel=0.01)


def test_an_8b_bf16_base_sharded_over_8_processes_fits_80_gib_gpus():
    cfg = load_config(CONFIGS / "gpu-8b-fsdp.yaml")
    assert cfg.fsdp and cfg.base_dtype == "bfloat16"
    sharded = estimate_memory(LLAMA_8B, cfg, "bf16", processes=8, fsdp=True)
    whole = estimate_memory(LLAMA_8B, cfg, "bf16")
    assert whole.base == pytest.approx(2 * 8.03e9, rel=0.01)  # 16 GB of bf16 weights
    assert sharded.base == pytest.approx(whole.base / 8)
    assert sharded.optimizer == pytest.approx(whole.optimizer / 8)
    assert sharded.activations == whole.activations  # each process its own batch
    assert sharded.total < 80 * GIB
    ddp = estimate_memory(LLAMA_8B, cfg, "bf16", processes=8, fsdp=False)
    assert ddp.total > sharded.total + whole.base / 2  # unsharded, each process holds the whole base


@pytest.mark.parametrize(
    ("name", "processes", "fsdp"), [("gpu-8b-qlora.yaml", 1, False), ("gpu-8b-fsdp.yaml", 8, True)]
)
def test_the_8b_configs_say_the_estimate_they_print(name, processes, fsdp):
    if "qlora" in name and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA configs need bitsandbytes")
    path = CONFIGS / name
    quoted = re.search(r"memory estimate: ([\d.]+) GiB per device", path.read_text())
    assert quoted, f"{name} quotes no estimate"
    estimate = estimate_memory(LLAMA_8B, load_config(path), "bf16", processes, fsdp)
    assert f"{estimate.total / GIB:.2f}" == quoted.group(1)
