"""What hardware-aware tree choice (``tree_choice``) weighs: each tree's step cost here, and its tokens per step.

A bigger tree accepts more tokens per step but makes each step slower, and how much slower depends on
the device (on a CPU, 4 tokens can cost less than 3: the GEMM kernels differ). So the cost of one
generation step with each candidate tree is measured, warm and repeatedly, and the tree with the most
``predicted_tokens_per_step(T) / cost(T)`` wins.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from medusa_lora.attention import tree_attention_kwargs
from medusa_lora.drafting import HeadDrafter
from medusa_lora.kv_cache import compact_cache, truncate_cache
from medusa_lora.model import MedusaLoraModel
from medusa_lora.tree import TokenTree, expected_accepted_length, walked_accepted_length
from medusa_lora.verify import greedy_verify

# every size up to 12 (a chain as deep as 8 path-conditioned heads is 9 nodes: on a 2-core CPU it beat 8 and 10
# nodes by 3-6%, docs/benchmarks.md), then the larger trees a GPU affords
DEFAULT_SIZES = (*range(1, 13), 16, 24, 32)


@dataclass(frozen=True)
class StepCost:
    """Seconds of one greedy generation step with a tree (the fastest of repeated rounds), split as
    ``generate()`` spends them.

    ``draft``: the heads' forward and LM-head matmul, their top-k, filling the tree (0 for plain decoding).
    ``verify``: the tree attention mask, the decoder forward, the LM head, verification, cache compaction.
    """

    draft: float
    verify: float

    @property
    def total(self) -> float:
        return self.draft + self.verify


@torch.inference_mode()
def measure_step_costs(
    model: MedusaLoraModel, trees: Sequence[TokenTree], prefix_len: int = 256, repeats: int = 5
) -> dict[TokenTree, StepCost]:
    """What one generation step costs on ``model``'s device with each tree (the root-only tree: plain decoding).

    One warm-up round, then ``repeats`` rounds over all trees, each timing the heads' drafting and the
    verification step back to back (interleaved, so a drift in machine load or clock speed hits every tree
    and both parts alike); each part's fastest round is kept, as ``timeit`` advises: interference only adds
    time, and on a 2-core VM medians of 5 rounds moved trees' relative costs by 8-24% between four tunings,
    the fastest rounds by 2-7% (docs/benchmarks.md)."""
    vocab = model.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, prefix_len), generator=generator).to(model.device)
    cache = DynamicCache(config=model.model_config)
    hidden = model.hidden_states(prefix, cache=cache, use_cache=True)[0, -1]
    drafter = HeadDrafter(model.heads)
    times: dict[TokenTree, tuple[list[float], list[float]]] = {tree: ([], []) for tree in trees}
    for _ in range(repeats + 1):
        for tree, (draft_times, verify_times) in times.items():
            start = time.perf_counter()
            tokens = _draft(model, drafter, tree, hidden)
            draft_times.append(time.perf_counter() - start if tree.size > 1 else 0.0)
            start = time.perf_counter()
            attention = tree_attention_kwargs(model.causal_lm, tree, prefix_len) if tree.size > 1 else {}
            positions = (prefix_len + tree.tensors(model.device).depths)[None]
            out = model.hidden_states(
                tokens[None], position_ids=positions, cache=cache, use_cache=True, **attention
            )
            accepted, _ = greedy_verify(tokens, model.lm_head(out[0]), tree)  # its int() waits for the device
            compact_cache(cache, prefix_len, accepted)
            verify_times.append(time.perf_counter() - start)
            truncate_cache(cache, prefix_len)
    return {  # round 0 warms up
        tree: StepCost(draft=min(d[1:]), verify=min(v[1:])) for tree, (d, v) in times.items()
    }


def _draft(
    model: MedusaLoraModel, drafter: HeadDrafter, tree: TokenTree, hidden: torch.Tensor
) -> torch.Tensor:
    """A speculative step's drafting as ``generate()`` does it: the heads at the last accepted position,
    their top-k, the tree's tokens (root first); for the root-only tree, just the root."""
    root = torch.zeros(1, dtype=torch.long, device=model.device)
    if tree.size == 1:
        return root
    tensors = tree.tensors(model.device)
    head_logits = model.draft_logits(hidden, root[0], depth=tree.depth)
    candidates = drafter(head_logits, [], tree.depth, tree.max_rank).to(model.device)
    return torch.cat([root, candidates[tensors.head_index, tensors.rank_index]])


def predicted_tokens_per_step(model: MedusaLoraModel, tree: TokenTree) -> float | None:
    """Tokens one greedy step is expected to emit with ``tree`` (the base model's own token included), from
    calibration: generation walked over the held-out completions (``walked_accepted_length``), else (models
    calibrated before the walk) the hit rates' expectation; comparable with ``GenerationStats.mean_accepted_length``.
    None when the model has no calibration, or the tree is deeper than its heads."""
    config = model.config
    if not config.hit_rates or tree.depth > len(config.hit_rates):  # deeper than the heads: a copy drafter's
        return None
    if config.greedy_ranks:
        return walked_accepted_length(tree, config.greedy_ranks)
    return expected_accepted_length(tree, config.hit_rates)
