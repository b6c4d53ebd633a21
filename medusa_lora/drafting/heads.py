"""The Medusa heads as a drafter: their top-k per depth."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medusa_lora.drafting.drafter import Drafter
from medusa_lora.model.heads import MedusaHeads
from medusa_lora.trees.tree import TokenTree


class HeadDrafter(Drafter):
    """Candidates = the heads' top-``tree.max_rank`` at each depth (token ids, through a draft vocabulary)."""

    uses_heads = True

    def __init__(self, heads: MedusaHeads) -> None:
        self.heads = heads

    def draft(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], tree: TokenTree
    ) -> tuple[torch.Tensor, TokenTree]:
        if head_logits is None:
            raise ValueError("HeadDrafter drafts from the heads: head_logits is None")
        return self.heads.token_ids(head_logits[: tree.depth].topk(tree.max_rank, dim=-1).indices), tree
