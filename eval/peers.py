"""Tuned peers, timed like ``generate()``: transformers' prompt lookup, and suffix decoding through our loop.

Both are tuned on validation prompts the same way (``_tune``). Their drafts are a deterministic function
of the context, and in greedy decoding every verified token is the model's own greedy token, so the
tokens each step accepts follow exactly from one plain greedy run per prompt (a walk over it), with no model
forward: every setting of the sweep is simulated that way (tokens per step, tokens drafted per step).
What a walk cannot know is the device's price for verifying k extra tokens, so one measured ratio
(a forward of 1 + K tokens over a cached prompt vs a forward of 1) turns each setting's steps into an
estimated speedup; the ``finalists`` best by that estimate are then timed for real on every validation
prompt, interleaved (``interleaved_speeds``), and the best median tok/s among them wins. The estimate
only decides which settings are timed, so the choice stays "best of the sweep" up to settings the cost
model ranks below the top few.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from medusa_lora.decoding import GenerationOutput, GenerationStats, generate
from medusa_lora.drafting.suffix import SuffixDrafter
from medusa_lora.errors import ConfigError
from medusa_lora.model.base import cache_argument
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import chain_tree

S = TypeVar("S", "PromptLookupSetting", "SuffixSetting")
T = TypeVar("T")


@dataclass(frozen=True)
class PromptLookupSetting:
    """transformers' ``prompt_lookup_num_tokens`` and ``max_matching_ngram_size``."""

    num_tokens: int
    ngram_size: int

    @property
    def label(self) -> str:
        return f"prompt lookup (transformers), {self.num_tokens} tokens, n-gram {self.ngram_size}"


@dataclass(frozen=True)
class SuffixSetting:
    """Suffix decoding verified as a chain of at most ``max_depth`` drafted tokens per step."""

    max_depth: int

    @property
    def label(self) -> str:
        return f"suffix decoding, up to {self.max_depth} tokens"

    def drafter(self) -> SuffixDrafter:
        return SuffixDrafter()


class _PastLengths:
    """Records, at each forward of ``module``, how many tokens its KV cache holds (the decoder forwards)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.lengths: list[int] = []

    def __enter__(self) -> list[int]:
        def record(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
            cache = kwargs.get(cache_argument(_module))
            self.lengths.append(cache.get_seq_length() if cache is not None else 0)

        self.handle = self.module.register_forward_pre_hook(record, with_kwargs=True)
        return self.lengths

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class _FirstTokenClock:
    """A streamer noting when the first new tokens arrive: transformers' ``generate`` first puts the prompt,
    then one put per forward (assisted generation's first forward, the prefill, may carry several tokens)."""

    def __init__(self) -> None:
        self.puts: list[int] = []  # tokens per put
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.numel())
        if len(self.puts) == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _causal_lm(model: nn.Module) -> nn.Module:
    """The module whose forward is one decoder forward (a PeftModel's base model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


@torch.inference_mode()
def prompt_lookup_generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    setting: PromptLookupSetting,
) -> GenerationOutput:
    """Greedy ``model.generate`` with prompt lookup (``setting``) on token ids, with our stats.

    ``stats.accepted_lengths`` holds the tokens emitted by each decoder forward after the first (the
    prefill, which also verifies a draft from the prompt), counted from the KV-cache length at each
    forward; ``sum(accepted_lengths)`` is the tokens emitted after the first token time.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    eos = list(eos_token_ids)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        prompt_lookup_num_tokens=setting.num_tokens,
        max_matching_ngram_size=setting.ngram_size,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    clock = _FirstTokenClock()
    with _PastLengths(_causal_lm(model)) as past_lengths:
        start = time.perf_counter()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=clock,
        )
        tokens = output[0, input_ids.shape[1] :].tolist()  # on the clock: a CUDA sync, as in generate()
        wall = time.perf_counter() - start
    # before forward i >= 1 the cache holds all but the last emitted token: sequence length = past + 1
    lengths = [past + 1 for past in past_lengths[1:]] + [input_ids.shape[1] + len(tokens)]
    stats = GenerationStats(
        new_tokens=len(tokens),
        prompt_tokens=input_ids.shape[1],
        wall_time_s=wall,
        time_to_first_token_s=(clock.first_token_at or start + wall) - start,
        accepted_lengths=[b - a for a, b in pairwise(lengths)],
    )
    return GenerationOutput(tokens, stats)


@torch.inference_mode()
def suffix_generate(
    model: MedusaLoraModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    setting: SuffixSetting,
    drafter: SuffixDrafter | None = None,
) -> GenerationOutput:
    """Greedy ``generate()`` drafted by suffix decoding. Pass one ``drafter`` to a series of calls to let
    each call draft from the earlier outputs too (the paper's global cache); without one, a fresh one."""
    return generate(
        model,
        list(prompt_ids),
        max_new_tokens,
        tree=chain_tree(setting.max_depth),
        drafter=drafter if drafter is not None else setting.drafter(),
        eos_token_id=list(eos_token_ids),
    )


@torch.inference_mode()
def _greedy(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' plain greedy output."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=next(model.parameters()).device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[
        0, ids.shape[1] :
    ].tolist()


@dataclass
class _Walk:
    """A setting's steps walked against the greedy outputs: drafted and accepted tokens per forward."""

    drafted: list[int]
    accepted: list[int]


def _walk_prompt_lookup(
    setting: PromptLookupSetting,
    prompt: Sequence[int],
    truth: Sequence[int],
    max_new_tokens: int,
    eos: Sequence[int],
) -> _Walk:
    """transformers' own candidate generator over the greedy output, step by step (the prefill included)."""
    proposer = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor(list(eos)) if eos else None,
        num_output_tokens=setting.num_tokens,
        max_matching_ngram_size=setting.ngram_size,
        max_length=len(prompt) + max_new_tokens,
    )
    walk = _Walk([], [])
    done = 0
    while done < len(truth):
        sequence = torch.tensor([list(prompt) + list(truth[:done])])
        draft = proposer.get_candidates(sequence)[0][0, sequence.shape[1] :].tolist()
        step = _accepted(draft, truth[done:])
        walk.drafted.append(len(draft))
        walk.accepted.append(step)
        done += step
    return walk


def _walk_suffix(
    setting: SuffixSetting, prompts: Sequence[Sequence[int]], truths: Sequence[Sequence[int]]
) -> list[_Walk]:
    """The suffix drafter over the greedy outputs, prompts in order (so the cache of outputs grows)."""
    drafter = setting.drafter()
    walks = []
    for prompt, truth in zip(prompts, truths):
        drafter.begin(prompt)
        walk = _Walk([0], [1])  # the prefill: one token, no draft
        done = 1
        while done < len(truth):
            draft = drafter.propose(list(truth[:done]), setting.max_depth)
            step = _accepted(draft, truth[done:])
            walk.drafted.append(len(draft))
            walk.accepted.append(step)
            done += step
        drafter.end(truth)
        walks.append(walk)
    return walks


def _accepted(draft: Sequence[int], rest: Sequence[int]) -> int:
    """Tokens one greedy verification emits: the draft's matching prefix plus the model's own token."""
    matches = 0
    while matches < len(draft) and matches < len(rest) - 1 and draft[matches] == rest[matches]:
        matches += 1
    return min(matches + 1, len(rest))


@torch.inference_mode()
def verify_cost_ratio(
    model: nn.Module, prompt_ids: Sequence[int], extra_tokens: int, repeats: int = 5
) -> float:
    """Time of a forward of ``1 + extra_tokens`` tokens over the cached prompt / time of a 1-token one."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = DynamicCache()
    cached = {cache_argument(model): cache, "use_cache": True}
    model(input_ids=ids, **cached)

    def forward_time(width: int) -> float:
        times = []
        for _ in range(repeats):
            step = ids[:, -1:].repeat(1, width)
            start = time.perf_counter()
            model(input_ids=step, **cached).logits[0, -1].argmax().item()
            times.append(time.perf_counter() - start)
            cache.crop(-width)
        return statistics.median(times)

    return forward_time(1 + extra_tokens) / forward_time(1)


Runner = Callable[[Sequence[int]], GenerationOutput]  # prompt ids -> output


def rotated(items: Sequence[T], n: int) -> list[T]:
    """The order run ``n`` takes ``items`` in: each run starts one item later, so the costs a prompt's first run
    pays (longer caches, new shapes) and a drift of the machine's speed fall on every item alike."""
    k = n % len(items)
    return [*items[k:], *items[:k]]


def interleaved_speeds(
    make_runners: Sequence[Callable[[], Runner]], prompts: Sequence[Sequence[int]]
) -> list[list[float]]:
    """tok/s of each setting's runner per prompt, the settings interleaved prompt by prompt (``rotated``), as the
    eval runs its rows: a setting timed alone, before or after the others, would carry the machine's drift.

    Each setting first runs the first prompt untimed with a runner of its own (its first forwards of new shapes,
    Triton compiles on a GPU, are not charged to it); a fresh runner is then timed, so its state (a suffix
    drafter's cache of outputs) starts empty and grows over the prompts in order."""
    for make_runner in make_runners:
        make_runner()(prompts[0])
    runners = [make_runner() for make_runner in make_runners]
    speeds = [[0.0] * len(prompts) for _ in runners]
    for n, prompt in enumerate(prompts):
        for k in rotated(range(len(runners)), n):
            speeds[k][n] = runners[k](prompt).stats.tokens_per_s
    return speeds


def _tune(
    settings: Sequence[S],
    walks: dict[S, list[_Walk]],
    max_draft: int,
    cost_ratio: float,
    speeds: Callable[[list[S]], list[list[float]]],
    finalists: int,
    progress: bool,
) -> tuple[S, list[dict]]:
    """Rank settings by estimated speedup from their walks, time the ``finalists`` best together (``speeds``:
    tok/s per setting and validation prompt), pick the best median. Tokens per step leave out the prefill, as ``generate``."""
    table = []
    for setting in settings:
        drafted = [d for r in walks[setting] for d in r.drafted]
        accepted = [a for r in walks[setting] for a in r.accepted[1:]]
        cost = sum(1 + (cost_ratio - 1) * d / max_draft for d in drafted)  # in 1-token forwards
        table.append(
            {
                "setting": setting.label,
                **vars(setting),
                "tokens_per_step": sum(accepted) / len(accepted) if accepted else None,
                "drafted_per_step": sum(drafted) / len(drafted),
                "estimated_speedup": sum(a for r in walks[setting] for a in r.accepted) / cost,
                "median_tok_s": None,
                "chosen": False,
            }
        )
    order = sorted(range(len(settings)), key=lambda i: -table[i]["estimated_speedup"])
    timed = speeds([settings[i] for i in order[:finalists]])
    for i, per_prompt in zip(order[:finalists], timed):
        table[i]["median_tok_s"] = statistics.median(per_prompt)
        if progress:
            print(f"  {settings[i].label}: {table[i]['median_tok_s']:.1f} tok/s", flush=True)
    best = max(order[:finalists], key=lambda i: table[i]["median_tok_s"])
    table[best]["chosen"] = True
    return settings[best], table


def _check_sweep(prompts: Sequence[Sequence[int]], finalists: int, **grids: Sequence[int]) -> None:
    if not prompts:
        raise ConfigError("tuning needs at least one validation prompt")
    if finalists < 1:
        raise ConfigError(f"finalists must be >= 1, got {finalists}")
    for name, values in grids.items():
        if not values or min(values) < 1:
            raise ConfigError(f"{name} must be a non-empty list of integers >= 1, got {list(values)}")


def tune_prompt_lookup(
    model: nn.Module,
    validation_prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    num_tokens: Sequence[int] = range(2, 11),
    ngram_sizes: Sequence[int] = (1, 2, 3),
    finalists: int = 3,
    progress: bool = False,
) -> tuple[PromptLookupSetting, list[dict]]:
    """The prompt-lookup setting (tokens x n-gram size) with the best median tok/s on the validation
    prompts (see the module docstring for how the sweep is kept cheap), and the sweep's table."""
    _check_sweep(validation_prompts, finalists, num_tokens=num_tokens, ngram_sizes=ngram_sizes)
    settings = [PromptLookupSetting(k, n) for k in num_tokens for n in ngram_sizes]
    eos = list(eos_token_ids)
    truths = [_greedy(model, p, max_new_tokens, eos) for p in validation_prompts]  # also warms up
    walks = {
        s: [_walk_prompt_lookup(s, p, t, max_new_tokens, eos) for p, t in zip(validation_prompts, truths)]
        for s in settings
    }
    ratio = verify_cost_ratio(_causal_lm(model), validation_prompts[0], max(num_tokens))

    def speeds(timed: list[PromptLookupSetting]) -> list[list[float]]:
        def runner(setting: PromptLookupSetting) -> Callable[[], Runner]:
            return lambda: lambda p: prompt_lookup_generate(model, p, max_new_tokens, eos, setting)

        return interleaved_speeds([runner(s) for s in timed], validation_prompts)

    return _tune(settings, walks, max(num_tokens), ratio, speeds, finalists, progress)


def tune_suffix(
    model: MedusaLoraModel,
    validation_prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    max_depths: Sequence[int] = (2, 3, 4, 6, 8, 12),
    finalists: int = 3,
    progress: bool = False,
) -> tuple[SuffixSetting, list[dict]]:
    """The suffix-decoding speculation depth with the best median tok/s on the validation prompts (run in
    order with one drafter per setting, as the eval runs its prompts), and the sweep's table."""
    _check_sweep(validation_prompts, finalists, max_depths=max_depths)
    settings = [SuffixSetting(d) for d in max_depths]
    eos = list(eos_token_ids)
    truths = [
        generate(model, list(p), max_new_tokens, speculative=False, eos_token_id=eos).tokens
        for p in validation_prompts
    ]
    walks = {s: _walk_suffix(s, validation_prompts, truths) for s in settings}
    ratio = verify_cost_ratio(model.causal_lm, validation_prompts[0], max(max_depths))

    def speeds(timed: list[SuffixSetting]) -> list[list[float]]:
        def runner(setting: SuffixSetting) -> Callable[[], Runner]:
            def make() -> Runner:
                drafter = setting.drafter()  # one per runner, as in the walk: its cache of outputs grows
                return lambda p: suffix_generate(model, p, max_new_tokens, eos, setting, drafter)

            return make

        return interleaved_speeds([runner(s) for s in timed], validation_prompts)

    return _tune(settings, walks, max(max_depths), ratio, speeds, finalists, progress)
