"""Hardware-aware tree choice: the calibrated tree whose expected tokens per second is highest here.

A bigger tree accepts more tokens per step but makes each step's forward slower, and how much slower
depends on the device (on a CPU, 4 tokens can cost less than 3: the GEMM kernels differ). So measure
the step cost for each tree size once, and pick ``argmax_T expected_accepted_length(T) / cost(T)``
with the trees built from the heads' measured hit rates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from medusa_lora.attention import tree_attention_kwargs
from medusa_lora.kv_cache import truncate_cache
from medusa_lora.model import MedusaLoraModel
from medusa_lora.tree import TokenTree, calibrated_tree, chain_tree, expected_accepted_length

DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)


@torch.inference_mode()
def measure_step_costs(
    model: MedusaLoraModel, sizes: Sequence[int] = DEFAULT_SIZES, prefix_len: int = 256, repeats: int = 5
) -> dict[int, float]:
    """Median seconds of one verification forward (decoder + LM head) of T tree tokens, per T.

    One warm-up round, then ``repeats`` rounds over all sizes (interleaved, so a drift in machine load
    or clock speed hits every size alike)."""
    vocab = model.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, prefix_len), generator=generator).to(model.device)
    cache = DynamicCache(config=model.model_config)
    model.hidden_states(prefix, cache=cache, use_cache=True)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(repeats + 1):
        for size in sizes:
            tree = chain_tree(size - 1)  # the cost depends on the node count, not on the shape
            attention = tree_attention_kwargs(model.causal_lm, tree, prefix_len) if size > 1 else {}
            positions = (prefix_len + tree.tensors(model.device).depths)[None]
            tokens = torch.randint(0, vocab, (1, size), generator=generator).to(model.device)
            start = time.perf_counter()
            hidden = model.hidden_states(
                tokens, position_ids=positions, cache=cache, use_cache=True, **attention
            )
            model.lm_head(hidden[0]).argmax(-1).tolist()  # .tolist() waits for the device
            times[size].append(time.perf_counter() - start)
            truncate_cache(cache, prefix_len)
    return {size: statistics.median(samples[1:]) for size, samples in times.items()}  # round 0 warms up


def best_tree(
    hit_rates: Sequence[Sequence[float]], costs: dict[int, float], heads_cost: float = 0.0
) -> TokenTree:
    """The calibrated tree with the most expected tokens per second; ``heads_cost`` is added to every
    speculative step (the heads' own matmul). Returns the root-only tree if speculation does not pay."""
    best, best_rate = TokenTree([]), 1.0 / costs[min(costs)] if 1 in costs else 0.0
    for size, cost in sorted(costs.items()):
        if size < 2:
            continue
        tree = calibrated_tree(hit_rates, size)
        rate = expected_accepted_length(tree, hit_rates) / (cost + heads_cost)
        if rate > best_rate:
            best, best_rate = tree, rate
    return best


@torch.inference_mode()
def tune_tree(model: MedusaLoraModel, sizes: Sequence[int] = DEFAULT_SIZES) -> TokenTree:
    """The best tree for ``model`` on its device, from the hit rates measured at calibration."""
    if not model.config.hit_rates:
        raise ValueError(
            "the model has no measured hit rates (train it with calibration) to tune a tree from"
        )
    costs = measure_step_costs(model, sizes)
    hidden = torch.zeros(model.config.hidden_size, device=model.device, dtype=model.dtype)
    start = time.perf_counter()
    model.heads(hidden, model.lm_head).argmax(-1).tolist()
    return best_tree(model.config.hit_rates, costs, heads_cost=time.perf_counter() - start)


def tuned_tree(model: MedusaLoraModel) -> TokenTree:
    """``tune_tree(model)``, measured on first use and kept on the model (``model.tuned_tree``)."""
    if model.tuned_tree is None:
        model.tuned_tree = tune_tree(model)
    return model.tuned_tree
