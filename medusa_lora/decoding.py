"""``generate()``: prefill, then a loop of generation's steps (draft a tree, verify it, emit what was accepted)
until a stop rule. With ``speculative=False`` the tree is the root alone: plain incremental decoding on the
very same code path, the baseline every speedup is measured against.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from medusa_lora.drafting.drafter import Drafter
from medusa_lora.drafting.heads import HeadDrafter
from medusa_lora.errors import ConfigError, PromptError
from medusa_lora.generation import Accept, draft, prefill, verify
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.choice import TreeSpec, choose_tree
from medusa_lora.trees.tree import ROOT_ONLY, TokenTree
from medusa_lora.verification.forward import decoder_forward
from medusa_lora.verification.verify import (
    SamplingConfig,
    greedy_verify,
    sampling_verify,
    target_probs,
)


@dataclass
class GenerationStats:
    """What one ``generate`` call did; ``accepted_lengths[i]`` is the tokens emitted by step i, and
    ``draft_time_s`` the time in ``generation.draft`` (heads, drafter, the tree's tokens; device waits
    included)."""

    accepted_lengths: list[int] = field(default_factory=list)
    new_tokens: int = 0
    prompt_tokens: int = 0
    wall_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    draft_time_s: float = 0.0
    capture_time_s: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step (the prefill's first token is not a step)."""
        return sum(self.accepted_lengths) / self.steps if self.steps else 0.0

    @property
    def accepted_length_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accepted_lengths).items()))

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "steps": self.steps,
            "tokens_per_s": self.tokens_per_s,
            "mean_accepted_length": self.mean_accepted_length,
            "accepted_length_histogram": self.accepted_length_histogram,
        }


@dataclass
class GenerationOutput:
    tokens: list[int]
    stats: GenerationStats
    text: str | None = None


class _Stopper:
    """Tracks the emitted tokens and decides when to stop: EOS, stop strings, max_new_tokens."""

    def __init__(self, max_new_tokens: int, eos: set[int], stop_strings: Sequence[str], tokenizer) -> None:
        if stop_strings and tokenizer is None:
            raise ConfigError("stop_strings need a tokenizer (load the model by name or pass tokenizer=)")
        self.max_new_tokens, self.eos, self.stop_strings, self.tokenizer = (
            max_new_tokens,
            eos,
            stop_strings,
            tokenizer,
        )
        self.window = max((len(s) for s in stop_strings), default=0) + 2
        self.tokens: list[int] = []
        self.done = max_new_tokens <= 0

    def emit(self, tokens: Sequence[int]) -> list[int]:
        """Append tokens until a stop condition; return those appended."""
        taken = []
        for token in tokens:
            if self.done:
                break
            self.tokens.append(token)
            taken.append(token)
            self.done = (
                len(self.tokens) >= self.max_new_tokens or token in self.eos or self._hit_stop_string()
            )
        return taken

    def _hit_stop_string(self) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(self.tokens[-self.window :])
        return any(s in tail for s in self.stop_strings)


@torch.inference_mode()
def generate(
    model: MedusaLoraModel,
    prompt: str | Sequence[int] | torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tree: TreeSpec = None,
    speculative: bool = True,
    streamer=None,
    stop_strings: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    typical_epsilon: float | None = None,
    seed: int | None = None,
    drafter: Drafter | None = None,
    tokenizer=None,
    fast: bool | None = None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, or token ids).

    Greedy (``temperature=0``) output equals the base model's greedy output token for token; with
    ``temperature > 0`` the output distribution equals plain sampling (temperature, ``top_p``).
    ``typical_epsilon`` switches to Medusa's typical acceptance, which is faster but lossy.
    ``tree`` (``trees.choice.TreeSpec``): a ``TokenTree``, a node count for a default tree, ``"auto"`` for the
    calibrated tree fastest on this device, or None / ``"calibrated"`` for the model's calibrated tree.
    ``drafter`` fills each step's tree (default: the model's heads, ``HeadDrafter``).
    ``fast`` (default: yes, ``verification.forward.forward_kind``) runs the decoder on the device's fast forward: on
    CUDA a static cache, each step size a CUDA graph captured once; on a CPU the lean forward (the CPU kernels, a
    preallocated cache, the same bits as eager) where it runs the model. False keeps transformers' eager forward.
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = _sampling_config(temperature, top_p, typical_epsilon)
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    if speculative and drafter is None:
        if model.heads is None:
            raise ConfigError("the model has no Medusa heads: pass speculative=False, or a drafter")
        drafter = HeadDrafter(model.heads)
    tree = _resolve_tree(model, tree, drafter) if speculative else ROOT_ONLY
    input_ids = _encode(prompt, tokenizer, model.device)
    context = _context_length(model)
    if input_ids.shape[1] >= context:
        raise PromptError(
            f"the prompt has {input_ids.shape[1]} tokens; the model's context is {context} tokens"
        )
    if eos_token_id is None:
        eos_token_id = eos_token_ids(model)
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    stopper = _Stopper(max_new_tokens, eos, stop_strings, tokenizer)
    stats = GenerationStats(prompt_tokens=input_ids.shape[1])
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def choose(logits: torch.Tensor) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))

    def emit(tokens: Sequence[int]) -> int:
        taken = stopper.emit(tokens)
        if streamer is not None and taken:
            streamer.put(torch.tensor(taken))
        return len(taken)

    accept = _acceptance(sampling, generator)
    start = time.perf_counter()
    # room for the prompt, the new tokens and one more step (a drafter may grow its tree: up to 64 nodes)
    forward = decoder_forward(model, input_ids.shape[1] + max_new_tokens + max(tree.size, 64), fast)
    context = min(context, forward.capacity or context)
    captured = forward.capture_time_s
    if drafter is not None:
        drafter.begin(input_ids[0].tolist())
    state = prefill(model, input_ids, choose, forward)
    emit([state.root])
    stats.time_to_first_token_s = time.perf_counter() - start

    while not stopper.done and state.prefix_len < context:
        step_tree = tree if state.prefix_len + tree.size <= context else ROOT_ONLY
        drafting = time.perf_counter()
        tokens, step_tree = draft(model, drafter, step_tree, state, stopper.tokens)
        if tree.size > 1:  # (plain decoding drafts nothing)
            stats.draft_time_s += time.perf_counter() - drafting
        if state.prefix_len + step_tree.size > context:  # a drafter grew the tree past the context
            tokens, step_tree = tokens[:1], ROOT_ONLY
        stats.accepted_lengths.append(emit(verify(state, tokens, step_tree, accept)))

    if drafter is not None:
        drafter.end(stopper.tokens)
    stats.wall_time_s = time.perf_counter() - start
    stats.capture_time_s = forward.capture_time_s - captured
    stats.new_tokens = len(stopper.tokens)
    if streamer is not None:
        streamer.end()
    text = tokenizer.decode(stopper.tokens, skip_special_tokens=True) if tokenizer is not None else None
    return GenerationOutput(stopper.tokens, stats, text)


def _acceptance(sampling: SamplingConfig, generator: torch.Generator | None) -> Accept:
    """The verification rule ``sampling`` asks for, as ``generation.verify`` takes it."""
    if sampling.greedy:
        return greedy_verify
    return lambda tokens, logits, tree: sampling_verify(tokens, logits, tree, sampling, generator)


def _resolve_tree(model: MedusaLoraModel, tree: TreeSpec, drafter: Drafter) -> TokenTree:
    tree = choose_tree(model, tree).tree
    if drafter.uses_heads:
        num_heads = model.config.num_heads
        if tree.depth > num_heads:
            raise ConfigError(
                f"the tree is {tree.depth} deep but the model has only {num_heads} Medusa heads"
            )
        if tree.max_rank > model.heads.vocab_size:
            raise ConfigError(
                f"the tree asks for top-{tree.max_rank} candidates; the heads score {model.heads.vocab_size} tokens"
            )
    return tree


def _context_length(model: MedusaLoraModel) -> int:
    """Positions generate() may use: the model's context, and no more than a sliding window (whose cache
    layers drop old rows, which would break in-place compaction)."""
    config = model.model_config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return min(config.max_position_embeddings, window - 1 if window else config.max_position_embeddings)


def _sampling_config(temperature: float, top_p: float, typical_epsilon: float | None) -> SamplingConfig:
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if typical_epsilon is not None and temperature == 0:
        raise ConfigError("typical acceptance samples: it needs temperature > 0")
    return SamplingConfig(temperature=temperature, top_p=top_p, typical_epsilon=typical_epsilon)


def _encode(prompt: str | Sequence[int] | torch.Tensor, tokenizer, device: torch.device) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ConfigError("a text prompt needs a tokenizer (load the model by name or pass tokenizer=)")
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise PromptError("the prompt is empty")
    return ids.to(device)


def eos_token_ids(model: MedusaLoraModel) -> list[int]:
    """The model's stop tokens: its generation config's EOS, else its config's."""
    generation_config = getattr(model.causal_lm, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None) or model.model_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
