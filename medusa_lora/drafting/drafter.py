"""The one interface ``generate()`` drafts through: ``Drafter.draft(head_logits, generated, tree)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from medusa_lora.trees.tree import TokenTree


class Drafter(ABC):
    """Proposes the candidate tokens of one step's tree.

    ``draft`` returns ``(candidates, tree)``: candidates (D, k) token ids, row d the guesses d + 1 tokens after
    the root, column r the rank-r guess; and the tree to verify, the step's ``tree`` or one made from it (cut to
    the D rows drafted, ``TokenTree.up_to_depth``, or grown), whose node ``path`` takes
    ``candidates[len(path) - 1, path[-1]]``. D may be 0: the step then verifies the root alone.
    ``generated`` is the tokens emitted so far, the root last; ``head_logits`` (K, V') are the Medusa heads'
    logits at the root's position when ``needs_head_logits()``, else None (their forward is skipped).
    ``begin(prompt)`` and ``end(generated)`` frame each request (default: nothing).
    """

    uses_heads: bool = False  # drafts from the heads: the tree's depth and ranks must fit them

    def begin(self, prompt: Sequence[int]) -> None:
        """A request starts with ``prompt`` (token ids)."""

    def end(self, generated: Sequence[int]) -> None:
        """The request ended, having emitted ``generated``."""

    def needs_head_logits(self) -> bool:
        """Whether the next ``draft`` reads ``head_logits``."""
        return self.uses_heads

    @abstractmethod
    def draft(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], tree: TokenTree
    ) -> tuple[torch.Tensor, TokenTree]: ...


def cut_to_rows(candidates: torch.Tensor, tree: TokenTree) -> tuple[torch.Tensor, TokenTree]:
    """``(candidates, tree)`` with the tree cut to the depth ``candidates`` fills (a drafter that guessed fewer
    tokens than the tree is deep)."""
    return candidates, tree.up_to_depth(candidates.shape[0])
