"""Drafters propose the candidate tokens that fill a tree: the Medusa heads, a test oracle, or a model-free
drafter that reads the context (``medusa_lora.suffix``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from medusa_lora.heads import MedusaHeads


class Drafter(Protocol):
    """Proposes top-k candidates per depth: returns (depth, k) token ids; row d is the guess d + 1 tokens
    after the root token. ``head_logits`` is (K, V) from the Medusa heads (None if ``uses_heads`` is False);
    ``generated`` is the tokens emitted so far, the root last.

    A drafter may return fewer rows than ``depth`` (even none): ``generate()`` then verifies the tree cut to
    that depth (``TokenTree.up_to_depth``), so a step with no draft costs a root-only forward.
    """

    uses_heads: bool

    def __call__(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], depth: int, k: int
    ) -> torch.Tensor: ...


@runtime_checkable
class ContextDrafter(Drafter, Protocol):
    """A drafter that also sees the prompt: ``generate()`` calls ``begin(prompt_ids)`` before the first
    step and ``end(generated)`` after the last (both on the clock)."""

    def begin(self, prompt: Sequence[int]) -> None: ...

    def end(self, generated: Sequence[int]) -> None: ...


class HeadDrafter:
    """The Medusa heads' own top-k (mapped to token ids when the heads use a draft vocabulary)."""

    uses_heads = True

    def __init__(self, heads: MedusaHeads) -> None:
        self.heads = heads

    def __call__(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], depth: int, k: int
    ) -> torch.Tensor:
        assert head_logits is not None
        return self.heads.token_ids(head_logits[:depth].topk(k, dim=-1).indices)


class OracleDrafter:
    """Knows the true continuation (e.g. the base model's greedy output) and proposes it at rank 0.

    For tests and benchmarks: with it every step should accept the full depth of the tree, which shows
    the tree, verification and cache machinery waste nothing. Other ranks hold arbitrary other tokens.
    """

    uses_heads = False

    def __init__(self, continuation: Sequence[int], vocab_size: int) -> None:
        self.continuation = list(continuation)
        self.vocab_size = vocab_size

    def __call__(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], depth: int, k: int
    ) -> torch.Tensor:
        start = len(generated)  # generated[-1] is the root; the next true token is continuation[start]
        out = torch.empty(depth, k, dtype=torch.long)
        for d in range(depth):
            pos = start + d
            true = self.continuation[pos] if pos < len(self.continuation) else 0
            out[d] = (true + torch.arange(k)) % self.vocab_size
        return out
