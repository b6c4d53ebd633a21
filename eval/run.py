"""The speed comparison: the same prompts through the task model (a) without speculation, (b) drafted by
generic Medusa heads, (c) drafted by its jointly trained heads, the tuned peers: (d) transformers' prompt
lookup and (e) suffix decoding, and (f) the hybrid of (c) and (e) in one tree.

Every row runs the way its users would run it: head rows on their best tree of >= 2 nodes for this device
(a note says when plain decoding was predicted faster), peers with the best setting of a sweep on
validation prompts. Rows are interleaved prompt by prompt, each prompt starting one row later than the one
before, so drift in machine load and a prompt's first-run costs hit every row alike.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import peft
import torch
import transformers
from tqdm import tqdm

from medusa_lora.decoding import GenerationOutput, generate
from medusa_lora.drafting.heads import HeadDrafter
from medusa_lora.drafting.hybrid import HybridDrafter
from medusa_lora.errors import ConfigError, IncompatibleBaseModelError
from medusa_lora.model.base import load_base_model, load_tokenizer
from medusa_lora.model.inference import for_inference
from medusa_lora.model.wrapper import ADAPTER_CONFIG, MedusaLoraModel
from medusa_lora.trees.choice import TreeChoice, choose_tree, relative_step_cost
from medusa_lora.trees.tree import ROOT_ONLY
from medusa_lora.verification.forward import forward_name

from . import peers
from .examples import EvalExample
from .report import REFERENCE_ROW, EvalReport, PromptResult, QualityRow, RowResult
from .scoring import Scorer


@dataclass(frozen=True)
class Setup:
    """One row of the table: how it turns prompt ids into an output, and its setting."""

    key: str
    name: str
    lossless: bool  # a speculative row of this library: its greedy output must equal row (a)'s
    run: peers.Runner  # prompt ids -> output
    setting: str
    tree: TreeChoice | None = None
    tuning: list[dict] = field(default_factory=list)  # a peer's sweep on validation prompts, or the trees
    # an auto tree was chosen from


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


def head_setup(
    key: str, name: str, model: MedusaLoraModel, tree: int | str | None, max_new_tokens: int, stop: list[int]
) -> Setup:
    """A row drafted by ``model``'s heads on its tree (``choose_tree``: at least 2 nodes)."""
    choice = choose_tree(model, tree, min_nodes=2)

    def run(ids: list[int]) -> GenerationOutput:
        return generate(model, ids, max_new_tokens, tree=choice.tree, eos_token_id=stop)

    tuning = [{**c.to_dict(), "chosen": c.tree == choice.tree} for c in choice.candidates]
    return Setup(key, name, True, run, choice.label, choice, tuning)


def make_setups(
    task: MedusaLoraModel,
    generic: MedusaLoraModel | None,
    validation: Sequence[EvalExample],
    max_new_tokens: int,
    tree: int | str | None,
    stop: list[int],
    progress: bool = True,
) -> list[Setup]:
    """Row (a), (b) with generic heads, (c), then the peers tuned on ``validation`` prompts."""

    def plain(ids: list[int]) -> GenerationOutput:
        return generate(task, ids, max_new_tokens, speculative=False, eos_token_id=stop)

    setups = [Setup(REFERENCE_ROW, "task LoRA, no speculation", False, plain, "plain greedy decoding")]
    if generic is not None:
        drafted = with_generic_heads(task, generic)
        setups.append(
            head_setup("b", "task LoRA + generic Medusa heads", drafted, tree, max_new_tokens, stop)
        )
    task_heads = head_setup("c", "task LoRA + joint task heads", task, tree, max_new_tokens, stop)
    setups.append(task_heads)
    if validation:
        prompts = [e.prompt_ids for e in validation]
        lookup, lookup_table = peers.tune_prompt_lookup(
            task.base, prompts, max_new_tokens, stop, progress=progress
        )
        setups.append(
            Setup(
                "d",
                "task LoRA + prompt lookup (transformers)",
                False,
                lambda ids: peers.prompt_lookup_generate(task.base, ids, max_new_tokens, stop, lookup),
                lookup.label,
                tuning=lookup_table,
            )
        )
        suffix, suffix_table = peers.tune_suffix(task, prompts, max_new_tokens, stop, progress=progress)
        drafter = suffix.drafter()  # one for the whole run: it also drafts from the earlier outputs
        setups.append(
            Setup(
                "e",
                "task LoRA + suffix decoding",
                True,
                lambda ids: peers.suffix_generate(task, ids, max_new_tokens, stop, suffix, drafter),
                suffix.label,
                tuning=suffix_table,
            )
        )
        setups.append(hybrid_setup(task, task_heads.tree, suffix, prompts, max_new_tokens, stop, progress))
    return setups


HYBRID_MIN_GAIN = 0.10  # what a setting must gain on validation prompts over a simpler one to be chosen


def hybrid_choice(tuning: Sequence[dict], min_gain: float = HYBRID_MIN_GAIN) -> dict:
    """The hybrid's setting from its sweep (entries with ``max_copy_tokens``, None for plain decoding, 0 for heads
    alone, and ``median_tok_s``): the simplest setting within ``min_gain`` of the fastest, in the order plain
    decoding, heads alone, then suffix paths from the shortest.

    A few validation prompts on a shared machine measure a setting only to within several percent, and the
    hybrid promises to be no slower than plain decoding or heads alone, so a near tie goes to the simpler
    setting (docs/decisions.md, "The hybrid's setting").
    """
    fastest = max(t["median_tok_s"] for t in tuning)

    def simplicity(entry: dict) -> float:
        depth = entry["max_copy_tokens"]
        return -1 if depth is None else depth

    near = [t for t in tuning if t["median_tok_s"] * (1 + min_gain) >= fastest]
    return min(near, key=simplicity)


def hybrid_setup(
    task: MedusaLoraModel,
    heads_tree: TreeChoice,
    suffix: peers.SuffixSetting,
    validation_prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: list[int],
    progress: bool = False,
) -> Setup:
    """Row (f): one tree from the task heads (row c's tree) and suffix decoding's path, ``HybridDrafter``: the
    heads left out while they accept less than their tree costs, and the path's nodes outside their tree while
    too few of them are accepted for what a node costs.

    Tuned like the peers, by median tok/s on the validation prompts, the settings interleaved: a path of up to row e's tuned depth, of
    half that, none (row c's drafter), or no drafting at all (plain decoding, as ``tree="auto"`` may choose;
    ``max_copy_tokens`` None in the tuning table); a near tie (``HYBRID_MIN_GAIN``) goes to the simpler setting
    (``hybrid_choice``). The path's drafting is host work each step, which the
    step-cost model does not see: where a step is cheap (a small model on a GPU) it can cost more than the
    extra accepted tokens bring, and then the hybrid is heads alone; where nothing drafted pays (prompts far
    from the task), it is plain decoding.
    """
    if not validation_prompts:
        raise ConfigError("tuning the hybrid row needs at least one validation prompt")
    heads_cost = relative_step_cost(task, heads_tree.tree)

    def make_drafter(depth: int) -> HeadDrafter | HybridDrafter:
        if depth == 0:
            return HeadDrafter(task.heads)
        return HybridDrafter(task.heads, suffix.drafter(), max_copy_tokens=depth, heads_step_cost=heads_cost)

    def make_runner(depth: int | None) -> peers.Runner:
        """Generation with a path of up to ``depth`` tokens (0: heads alone; None: plain decoding)."""
        if depth is None:
            return lambda p: generate(task, list(p), max_new_tokens, speculative=False, eos_token_id=stop)
        drafter = make_drafter(depth)  # one per runner, as the test prompts get: its suffix cache grows
        return lambda p: generate(
            task, list(p), max_new_tokens, tree=heads_tree.tree, drafter=drafter, eos_token_id=stop
        )

    tuning = []
    depths = [*sorted({suffix.max_depth, max(1, suffix.max_depth // 2), 0}, reverse=True), None]
    timed = peers.interleaved_speeds([lambda d=d: make_runner(d) for d in depths], validation_prompts)
    for depth, speeds in zip(depths, timed):
        tuning.append({"max_copy_tokens": depth, "median_tok_s": statistics.median(speeds)})
        if progress:
            path = {None: "plain decoding", 0: "no suffix path (heads alone)"}.get(
                depth, f"suffix path of up to {depth} tokens"
            )
            print(f"  hybrid, {path}: {tuning[-1]['median_tok_s']:.1f} tok/s")
    best = hybrid_choice(tuning)
    for entry in tuning:
        entry["chosen"] = entry is best
    depth = best["max_copy_tokens"]
    choice = TreeChoice(heads_tree.tree, heads_tree.source)  # no prediction: the copy path's hits are unknown
    if depth is None:
        setting = (
            "plain decoding (tuned: neither the heads nor a suffix path were "
            f"{HYBRID_MIN_GAIN:.0%} faster on validation prompts)"
        )
        choice = TreeChoice(ROOT_ONLY, "tuned")
    elif depth == 0:
        setting = (
            f"{heads_tree.label}, no suffix path (tuned: no suffix path was {HYBRID_MIN_GAIN:.0%} faster than "
            "heads alone on validation prompts)"
        )
    else:
        setting = f"{heads_tree.label} + suffix path of up to {depth} tokens (tuned)"
        if heads_cost is not None:
            setting += (
                f"; heads left out while they emit < {heads_cost:.2f} tokens/step (their tree's cost), path nodes"
                " outside their tree while accepted less than a node costs"
            )
    return Setup(
        "f", "task LoRA + joint heads + suffix (hybrid)", True, make_runner(depth), setting, choice, tuning
    )


def evaluate(
    task: MedusaLoraModel,
    generic: MedusaLoraModel | None,
    examples: Sequence[EvalExample],
    max_new_tokens: int = 128,
    tree: int | str | None = "auto",
    warmup: int = 1,
    decode: Callable[[list[int]], str] | None = None,
    stop_token_ids: Sequence[int] = (),
    scorer: Scorer | None = None,
    validation: Sequence[EvalExample] = (),
    progress: bool = True,
    lora_alone: MedusaLoraModel | None = None,
) -> EvalReport:
    """Run every row on every example (after ``warmup`` untimed prompts per row) and summarise.

    ``validation`` prompts tune the peers and the hybrid (rows d, e, f; without them those rows are left out).
    ``decode`` turns output tokens into text for ``scorer``; ``stop_token_ids`` end every row's answer.
    ``lora_alone``: the task's LoRA trained without heads; its greedy answers are scored beside the task
    model's (``EvalReport.quality_rows``), outside the timed rows.
    """
    if not examples:
        raise ConfigError("no test prompts to evaluate")
    stop = sorted(stop_token_ids)
    setups = make_setups(task, generic, validation, max_new_tokens, tree, stop, progress)
    warmup_prompts = validation or examples  # not test prompts where avoidable: suffix decoding would
    for setup in setups:  # remember their outputs
        for i in range(warmup):
            setup.run(warmup_prompts[i % len(warmup_prompts)].prompt_ids)
    if warmup:  # plain decoding keeps no state: this sizes caches and allocators to the longest test prompt
        setups[0].run(max(examples, key=lambda e: len(e.prompt_ids)).prompt_ids)
    outputs: dict[str, list[GenerationOutput]] = {s.key: [] for s in setups}
    for n, example in enumerate(tqdm(examples, desc="eval", unit="prompt", disable=not progress)):
        for setup in peers.rotated(setups, n):
            outputs[setup.key].append(setup.run(example.prompt_ids))
    reference = outputs[REFERENCE_ROW]
    rows = [summarise(s, outputs[s.key], reference, examples, decode, scorer) for s in setups]
    settings = {
        "num_prompts": len(examples),
        "num_validation_prompts": len(validation),
        "max_new_tokens": max_new_tokens,
        "tree": tree or "calibrated",
        "warmup": warmup,
        "stop_token_ids": stop,
    }
    quality_rows = []
    if lora_alone is not None and scorer is not None and decode is not None:
        quality_rows = [
            QualityRow(
                "joint heads + LoRA",
                "the task model: rows (a), (c), (f)",
                rows[0].quality,
                [p.text for p in rows[0].prompts],
            ),
            QualityRow(
                "LoRA alone",
                "mode lora: same data, steps and settings, no heads",
                *greedy_quality(
                    lora_alone, examples, max_new_tokens, stop, decode, scorer, progress, "LoRA alone"
                ),
            ),
        ]
    return EvalReport(rows, settings, environment(task), quality_rows)


def greedy_quality(
    model: MedusaLoraModel,
    examples: Sequence[EvalExample],
    max_new_tokens: int,
    stop: list[int],
    decode: Callable[[list[int]], str],
    scorer: Scorer,
    progress: bool = True,
    desc: str = "greedy",
) -> tuple[dict[str, float], list[str]]:
    """``scorer``'s metrics of ``model``'s plain greedy answers to ``examples``, and the answers."""
    texts = [
        decode(generate(model, e.prompt_ids, max_new_tokens, speculative=False, eos_token_id=stop).tokens)
        for e in tqdm(examples, desc=desc, unit="prompt", disable=not progress)
    ]
    return scorer(texts, examples), texts


def summarise(
    setup: Setup,
    outputs: Sequence[GenerationOutput],
    reference: Sequence[GenerationOutput],
    examples: Sequence[EvalExample],
    decode: Callable[[list[int]], str] | None,
    scorer: Scorer | None,
) -> RowResult:
    """The row's per-prompt results and summary numbers; speeds are compared with ``reference``'s."""
    texts = [decode(out.tokens) for out in outputs] if decode is not None else [None] * len(outputs)
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
            text=text,
        )
        for example, out, ref, text in zip(examples, outputs, reference, texts, strict=True)
    ]
    steps = [n for p in prompts for n in p.accepted_lengths]
    speed = statistics.median(p.tokens_per_s for p in prompts)
    reference_speed = statistics.median(out.stats.tokens_per_s for out in reference)
    quality = scorer(texts, examples) if scorer is not None and decode is not None else None
    choice = setup.tree
    return RowResult(
        key=setup.key,
        name=setup.name,
        lossless=setup.lossless,
        setting=setup.setting,
        tree_size=choice.tree.size if choice is not None else None,
        tree_source=choice.source if choice is not None else None,
        predicted_tokens_per_step=choice.predicted_tokens_per_step if choice is not None else None,
        note=choice.note if choice is not None else None,
        tuning=setup.tuning,
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
        "forward": forward_name(model),  # what every generate() row runs
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


def load_models(
    model: str,
    task_dir: Path,
    generic_dir: Path | None,
    dtype: torch.dtype,
    prepack: bool = True,
    draft_dtype: torch.dtype | None = torch.float16,
    weights: str | None = None,
) -> tuple[MedusaLoraModel, MedusaLoraModel | None]:
    """The task model and the generic heads on one shared copy of the base weights, prepared for inference
    (``for_inference``: the task LoRA merged, or unmerged beside int8 / int4 ``weights``, heads drafting in
    ``draft_dtype``, on a CPU float linear weights pre-packed) for every row alike."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base_model(model, dtype)
    generic = None
    if generic_dir is not None:
        if (generic_dir / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"{generic_dir} holds a LoRA; --generic-heads must be heads-only")
        generic = MedusaLoraModel.from_pretrained(base, generic_dir, dtype)  # before the task LoRA wraps base
    task = MedusaLoraModel.from_pretrained(base, task_dir, dtype).to(device)
    task = MedusaLoraModel(task.base, task.heads, task.config, load_tokenizer(model))
    task = for_inference(task, prepack, draft_dtype, weights)  # the shared base's layers: generic's too
    if generic is not None:
        generic = for_inference(generic.to(device), prepack, draft_dtype, weights)
    return task, generic


def load_lora_alone(
    model: str, directory: Path, dtype: torch.dtype, prepack: bool = True, weights: str | None = None
) -> MedusaLoraModel:
    """The task LoRA trained alone (``mode: lora``), on its own copy of the base, prepared as the task model."""
    if not (directory / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{directory} holds no LoRA adapter; --lora-alone needs a `mode: lora` model dir")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    alone = MedusaLoraModel.from_pretrained(model, directory, dtype).to(device)
    return for_inference(alone, prepack, weights=weights)
