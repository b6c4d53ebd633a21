"""``generate()``: draft a token tree with the Medusa heads, verify it in one forward, keep what matches.

Read top to bottom: prefill, then a loop of (draft -> tree forward -> verify -> compact cache -> emit).
With ``speculative=False`` the tree is the root alone, which is plain incremental decoding on the very
same code path: that is the baseline every speedup is measured against.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers import DynamicCache

from medusa_lora.attention import tree_attention_kwargs
from medusa_lora.drafting import Drafter, HeadDrafter, RequestHooks, TreeDrafter
from medusa_lora.errors import ConfigError, PromptError
from medusa_lora.kv_cache import compact_cache
from medusa_lora.model import MedusaLoraModel
from medusa_lora.tree import TokenTree
from medusa_lora.tree_choice import ROOT_ONLY, TreeRequest, choose_tree
from medusa_lora.verify import SamplingConfig, greedy_verify, sampling_verify, target_probs, typical_verify


@dataclass
class GenerationStats:
    """What one ``generate`` call did; ``accepted_lengths[i]`` is the tokens emitted by step i."""

    new_tokens: int = 0
    prompt_tokens: int = 0
    wall_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    draft_time_s: float = 0.0  # in the drafter and building each step's tree, waits for the device included
    accepted_lengths: list[int] = field(default_factory=list)

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
    tree: TokenTree | int | str | None = None,
    speculative: bool = True,
    streamer=None,
    stop_strings: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    typical_epsilon: float | None = None,
    seed: int | None = None,
    drafter: Drafter | TreeDrafter | None = None,
    tokenizer=None,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, or token ids).

    Greedy (``temperature=0``) output equals the base model's greedy output token for token; with
    ``temperature > 0`` the output distribution equals plain sampling (temperature, ``top_p``).
    ``typical_epsilon`` switches to Medusa's typical acceptance, which is faster but lossy.
    ``tree`` is a ``TokenTree``, a node count for a default tree, ``"auto"`` for the calibrated tree
    that is fastest on this device (measured once per model, see ``tree_tuning``), or None for the
    model's calibrated tree (else the 16-node default).
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = _sampling_config(temperature, top_p, typical_epsilon)
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    drafter = drafter if drafter is not None else HeadDrafter(model.heads)
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

    def emit(tokens: Sequence[int]) -> None:
        taken = stopper.emit(tokens)
        if streamer is not None and taken:
            streamer.put(torch.tensor(taken))

    start = time.perf_counter()
    if isinstance(drafter, RequestHooks):
        drafter.begin(input_ids[0].tolist())
    cache = DynamicCache(config=model.model_config)
    hidden = model.hidden_states(input_ids, cache=cache, use_cache=True)[0, -1]
    root = choose(model.lm_head(hidden))

    drafts_with_heads = tree.size > 1 and drafter.uses_heads
    asks_each_step = isinstance(drafter, TreeDrafter)  # a TreeDrafter says when it reads the heads' logits

    def heads_needed() -> bool:  # by the next step's draft
        return drafts_with_heads and (not asks_each_step or drafter.needs_head_logits())

    head_logits = model.draft_logits(hidden, root, depth=tree.depth) if heads_needed() else None
    emit([root])
    stats.time_to_first_token_s = time.perf_counter() - start
    prefix_len = input_ids.shape[1]

    while not stopper.done and prefix_len < context:
        step_tree = tree if prefix_len + tree.size <= context else ROOT_ONLY
        drafting = time.perf_counter()
        tokens, step_tree = _draft(step_tree, root, drafter, head_logits, stopper.tokens, model.device)
        if tree.size > 1:  # (plain decoding drafts nothing)
            stats.draft_time_s += time.perf_counter() - drafting
        if prefix_len + step_tree.size > context:  # a drafter grew the tree past the context
            tokens, step_tree = tokens[:1], ROOT_ONLY
        tensors = step_tree.tensors(model.device)
        attention = (
            tree_attention_kwargs(model.causal_lm, step_tree, prefix_len) if step_tree.size > 1 else {}
        )
        hidden = model.hidden_states(
            tokens[None],
            position_ids=(prefix_len + tensors.depths)[None],
            cache=cache,
            use_cache=True,
            **attention,
        )[0]
        logits = model.lm_head(hidden)
        if sampling.greedy:
            accepted, root = greedy_verify(tokens, logits, step_tree)
        elif sampling.typical_epsilon is not None:
            accepted, root = typical_verify(tokens, logits, step_tree, sampling, generator)
        else:
            accepted, root = sampling_verify(tokens, logits, step_tree, sampling, generator)
        compact_cache(cache, prefix_len, accepted)
        prefix_len += len(accepted)
        before = len(stopper.tokens)
        emit(tokens[accepted[1:]].tolist() + [root])
        stats.accepted_lengths.append(len(stopper.tokens) - before)
        if not stopper.done:
            head_logits = (
                model.draft_logits(hidden[accepted[-1]], root, depth=tree.depth) if heads_needed() else None
            )

    if isinstance(drafter, RequestHooks):
        drafter.end(stopper.tokens)
    stats.wall_time_s = time.perf_counter() - start
    stats.new_tokens = len(stopper.tokens)
    if streamer is not None:
        streamer.end()
    text = tokenizer.decode(stopper.tokens, skip_special_tokens=True) if tokenizer is not None else None
    return GenerationOutput(stopper.tokens, stats, text)


def _draft(
    tree: TokenTree,
    root: int,
    drafter: Drafter | TreeDrafter,
    head_logits: torch.Tensor | None,
    generated: list[int],
    device,
) -> tuple[torch.Tensor, TokenTree]:
    """The tree's tokens: the root, then each node's candidate (head ``depth-1``, top-k ``rank``); and the
    tree they fill: cut to the depth the drafter proposed, or as a ``TreeDrafter`` shaped it."""
    root_tensor = torch.tensor([root], device=device)
    if tree.size == 1:
        return root_tensor, tree
    if isinstance(drafter, TreeDrafter):
        candidates, tree = drafter.draft(head_logits, generated, tree)
        candidates = candidates.to(device)
    else:
        candidates = drafter(head_logits, generated, tree.depth, tree.max_rank).to(device)
        tree = tree.up_to_depth(candidates.shape[0])
    if tree.size == 1:
        return root_tensor, tree
    tensors = tree.tensors(device)
    return torch.cat([root_tensor, candidates[tensors.head_index, tensors.rank_index]]), tree


def _resolve_tree(model: MedusaLoraModel, tree: TreeRequest, drafter: Drafter | TreeDrafter) -> TokenTree:
    num_heads = model.config.num_heads
    tree = choose_tree(model, tree).tree
    if drafter.uses_heads and tree.depth > num_heads:
        raise ConfigError(f"the tree is {tree.depth} deep but the model has only {num_heads} Medusa heads")
    if drafter.uses_heads and tree.max_rank > model.heads.vocab_size:
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
