"""The speed comparison: the same prompts through the task model (a) without speculation, (b) drafted by
generic Medusa heads, (c) drafted by its jointly trained heads, (d) with transformers' prompt lookup.

Rows are interleaved prompt by prompt, so drift in machine load hits every row alike.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import peft
import torch
import transformers
from tqdm import tqdm

from medusa_lora.errors import ConfigError, IncompatibleBaseModelError
from medusa_lora.generation import GenerationOutput, eos_token_ids, generate
from medusa_lora.model import MedusaLoraModel
from medusa_lora.tree import TokenTree, default_tree
from medusa_lora.tree_tuning import tuned_tree

from .peers import prompt_lookup_generate
from .query_schema import score_outputs
from .report import REFERENCE_ROW, EvalReport, PromptResult, RowResult

DEFAULT_TREE_SIZE = 16
Runner = Callable[[list[int]], GenerationOutput]  # prompt ids -> output


@dataclass(frozen=True)
class EvalExample:
    """A test prompt as token ids (chat template applied), its reference completion and its schema."""

    id: str
    prompt_ids: list[int]
    reference: str
    columns: dict[str, str]


@dataclass(frozen=True)
class Setup:
    """One row of the table: how it turns prompt ids into an output."""

    key: str
    name: str
    lossless: bool
    run: Runner
    tree: TokenTree | None = None
    tree_source: str | None = None


def resolve_tree(model: MedusaLoraModel, tree: int | str | None) -> tuple[TokenTree, str]:
    """``tree`` nodes of the default tree; "auto": the calibrated tree tuned for this device; None: the
    model's calibrated tree; else the 16-node default."""
    if tree == "auto" and model.config.hit_rates:
        return tuned_tree(model), "tuned"
    if tree in (None, "auto") and model.config.tree:
        return TokenTree(model.config.tree), "calibrated"
    size = tree if isinstance(tree, int) else DEFAULT_TREE_SIZE
    return default_tree(size, model.config.num_heads), "default"


def with_generic_heads(task: MedusaLoraModel, generic: MedusaLoraModel) -> MedusaLoraModel:
    """The task model (LoRA included) as verifier, drafted by heads trained on the bare base; no copies."""
    if generic.has_lora:
        raise ConfigError("the generic heads must be heads-only (no LoRA): they are trained on the bare base")
    theirs, ours = generic.config, task.config
    if (theirs.hidden_size, theirs.vocab_size) != (ours.hidden_size, ours.vocab_size) or (
        theirs.base_fingerprint and ours.base_fingerprint and theirs.base_fingerprint != ours.base_fingerprint
    ):
        raise IncompatibleBaseModelError(
            f"the generic heads belong to base {theirs.base_model!r} ({theirs.base_fingerprint}), the task "
            f"model to {ours.base_model!r} ({ours.base_fingerprint})"
        )
    return MedusaLoraModel(task.base, generic.heads.to(task.device, task.dtype), theirs, task.tokenizer)


def make_setups(
    task: MedusaLoraModel,
    generic: MedusaLoraModel | None,
    max_new_tokens: int,
    tree: int | str | None,
    eos: list[int],
) -> list[Setup]:
    """Rows a-d ((b) only with generic heads); ``tree`` None means each model's calibrated tree."""

    def library(model: MedusaLoraModel, token_tree: TokenTree | None) -> Runner:
        speculative = token_tree is not None  # None: plain decoding
        return lambda ids: generate(
            model, ids, max_new_tokens, tree=token_tree, speculative=speculative, eos_token_id=eos
        )

    setups = [Setup(REFERENCE_ROW, "task LoRA, no speculation", False, library(task, None))]
    if generic is not None:
        drafted = with_generic_heads(task, generic)
        token_tree, source = resolve_tree(drafted, tree)
        setups.append(
            Setup(
                "b",
                "task LoRA + generic Medusa heads",
                True,
                library(drafted, token_tree),
                token_tree,
                source,
            )
        )
    token_tree, source = resolve_tree(task, tree)
    setups.append(
        Setup("c", "task LoRA + joint task heads", True, library(task, token_tree), token_tree, source)
    )
    setups.append(
        Setup(
            "d",
            "task LoRA + prompt lookup (transformers)",
            False,
            lambda ids: prompt_lookup_generate(task.base, ids, max_new_tokens, eos),
        )
    )
    return setups


def evaluate(
    task: MedusaLoraModel,
    generic: MedusaLoraModel | None,
    examples: Sequence[EvalExample],
    max_new_tokens: int = 128,
    tree: int | str | None = "auto",
    warmup: int = 1,
    decode: Callable[[list[int]], str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> EvalReport:
    """Run every row on every example (after ``warmup`` untimed prompts per row) and summarise.

    ``decode`` turns output tokens into text for the quality columns; without it they are left out.
    ``stop_token_ids`` end generation in every row (default: the task model's EOS tokens).
    """
    if not examples:
        raise ConfigError("no test prompts to evaluate")
    stop = sorted(stop_token_ids) if stop_token_ids is not None else eos_token_ids(task)
    setups = make_setups(task, generic, max_new_tokens, tree, stop)
    for setup in setups:
        for i in range(warmup):
            setup.run(examples[i % len(examples)].prompt_ids)
    outputs: dict[str, list[GenerationOutput]] = {s.key: [] for s in setups}
    for example in tqdm(examples, desc="eval", unit="prompt", disable=not progress):
        for setup in setups:
            outputs[setup.key].append(setup.run(example.prompt_ids))
    reference = outputs[REFERENCE_ROW]
    rows = [summarise(s, outputs[s.key], reference, examples, decode) for s in setups]
    settings = {
        "num_prompts": len(examples),
        "max_new_tokens": max_new_tokens,
        "tree": tree or "calibrated",
        "warmup": warmup,
        "stop_token_ids": stop,
    }
    return EvalReport(rows, settings, environment(task))


def summarise(
    setup: Setup,
    outputs: Sequence[GenerationOutput],
    reference: Sequence[GenerationOutput],
    examples: Sequence[EvalExample],
    decode: Callable[[list[int]], str] | None,
) -> RowResult:
    """The row's per-prompt results and summary numbers; speeds are compared with ``reference``'s."""
    prompts = [
        PromptResult(
            id=example.id,
            tokens=out.tokens,
            new_tokens=out.stats.new_tokens,
            wall_time_s=out.stats.wall_time_s,
            time_to_first_token_s=out.stats.time_to_first_token_s,
            tokens_per_s=out.stats.tokens_per_s,
            accepted_lengths=out.stats.accepted_lengths,
            identical=out.tokens == ref.tokens,
            text=decode(out.tokens) if decode is not None else None,
        )
        for example, out, ref in zip(examples, outputs, reference, strict=True)
    ]
    steps = [n for p in prompts for n in p.accepted_lengths]
    speed = statistics.median(p.tokens_per_s for p in prompts)
    reference_speed = statistics.median(out.stats.tokens_per_s for out in reference)
    quality = None
    if decode is not None:
        quality = score_outputs(
            [p.text for p in prompts], [e.reference for e in examples], [e.columns for e in examples]
        )
    return RowResult(
        key=setup.key,
        name=setup.name,
        lossless=setup.lossless,
        tree_size=setup.tree.size if setup.tree is not None else None,
        tree_source=setup.tree_source,
        prompts=prompts,
        tokens_per_s=speed,
        speedup=speed / reference_speed if reference_speed else 0.0,
        mean_accepted_length=sum(steps) / len(steps) if steps else None,
        accepted_length_histogram=dict(sorted(Counter(steps).items())),
        identical=sum(p.identical for p in prompts),
        quality=quality,
    )


def environment(model: MedusaLoraModel) -> dict[str, str | int | None]:
    """Versions, hardware, dtype and date, so a report says what produced it."""
    device = model.device
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
