"""Drafters for tests and benchmarks: ones that know the true continuation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from medusa_lora.drafting.drafter import Drafter, cut_to_rows
from medusa_lora.trees.tree import TokenTree


class RowDrafter(Drafter):
    """A drafter written as ``rows(generated, depth, k) -> (D <= depth, k)`` candidates; the tree is cut to D."""

    def rows(self, generated: Sequence[int], depth: int, k: int) -> torch.Tensor:
        raise NotImplementedError

    def draft(self, head_logits, generated, tree: TokenTree):
        return cut_to_rows(self.rows(generated, tree.depth, tree.max_rank), tree)


class OracleDrafter(RowDrafter):
    """Knows the true continuation (e.g. the base model's greedy output) and proposes it at rank 0, other ranks
    arbitrary other tokens: every step should then accept the tree's full depth."""

    def __init__(self, continuation: Sequence[int], vocab_size: int) -> None:
        self.continuation, self.vocab_size = list(continuation), vocab_size

    def rows(self, generated, depth, k):
        start = len(generated)  # generated[-1] is the root; the next true token is continuation[start]
        out = torch.empty(depth, k, dtype=torch.long)
        for d in range(depth):
            pos = start + d
            true = self.continuation[pos] if pos < len(self.continuation) else 0
            out[d] = (true + torch.arange(k)) % self.vocab_size
        return out


class NoisyOracleDrafter(RowDrafter):
    """Right most of the time: the true token at a random top-k rank with probability `hit`, else absent."""

    def __init__(self, continuation, vocab_size, hit=0.8, seed=0):
        self.continuation, self.vocab_size, self.hit = list(continuation), vocab_size, hit
        self.rng = random.Random(seed)

    def rows(self, generated, depth, k):
        out = torch.randint(
            0, self.vocab_size, (depth, k), generator=torch.Generator().manual_seed(self.rng.randrange(2**31))
        )
        for d in range(depth):
            pos = len(generated) + d
            true = self.continuation[pos] if pos < len(self.continuation) else 0
            out[d][out[d] == true] = (true + 1) % self.vocab_size
            if self.rng.random() < self.hit:
                out[d, self.rng.randrange(k)] = true
        return out
