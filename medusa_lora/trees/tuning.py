"""What hardware-aware tree choice (``choice``) weighs: each tree's step cost here, and its tokens per step.

A bigger tree accepts more tokens per step but makes each step slower, and how much slower depends on
the device (on a CPU, 4 tokens can cost less than 3: the GEMM kernels differ). So the cost of one
generation step with each candidate tree is measured, warm and repeatedly, and the tree with the most
``predicted_tokens_per_step(T) / cost(T)`` wins.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from medusa_lora.drafting.heads import HeadDrafter
from medusa_lora.generation import draft, prefill, verify
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import TokenTree
from medusa_lora.trees.walk import expected_accepted_length, walked_accepted_length
from medusa_lora.verification.forward import decoder_forward

# every size up to 12 (a chain as deep as 8 path-conditioned heads is 9 nodes), then the larger trees a GPU
# affords (docs/decisions.md)
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
    model: MedusaLoraModel,
    trees: Sequence[TokenTree],
    prefix_len: int = 256,
    repeats: int = 5,
    fast: bool | None = None,
) -> dict[TokenTree, StepCost]:
    """What one greedy generation step (``generation.draft`` with the heads, then ``generation.verify``) costs on
    ``model``'s device with each tree (the root-only tree: plain decoding), after a random ``prefix_len``-token
    prompt, on the forward ``generate(fast=fast)`` runs (``verification.forward``).

    One warm-up round, then ``repeats`` rounds over all trees, each timing the two steps back to back
    (interleaved, so a drift in machine load or clock speed hits every tree and both parts alike); each part's
    fastest round is kept, as ``timeit`` advises: interference only adds time."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.model_config.vocab_size, (1, prefix_len), generator=generator)
    forward = decoder_forward(model, prefix_len + max(tree.size for tree in trees), fast)
    prompt_state = prefill(model, prompt.to(model.device), lambda logits: int(logits.argmax()), forward)
    drafter = HeadDrafter(model.heads)
    times: dict[TokenTree, tuple[list[float], list[float]]] = {tree: ([], []) for tree in trees}
    for _ in range(repeats + 1):
        for tree, (draft_times, verify_times) in times.items():
            state = replace(prompt_state)  # the same cache, rewound after each step
            start = time.perf_counter()
            tokens, step_tree = draft(model, drafter, tree, state, [state.root])
            draft_times.append(time.perf_counter() - start if tree.size > 1 else 0.0)
            start = time.perf_counter()
            verify(state, tokens, step_tree)  # its int() waits for the device
            verify_times.append(time.perf_counter() - start)
            forward.rewind(prefix_len)
    return {  # round 0 warms up
        tree: StepCost(draft=min(d[1:]), verify=min(v[1:])) for tree, (d, v) in times.items()
    }


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
