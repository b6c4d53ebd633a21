"""The Medusa heads as a drafter: their top-k per depth."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

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


def top1_chain(
    heads: MedusaHeads,
    hidden: torch.Tensor,
    roots: torch.Tensor,
    embeddings: nn.Embedding,
    lm_head: nn.Linear,
    depth: int,
) -> torch.Tensor:
    """(B, H) hidden states at the roots' positions and (B,) roots -> (B, depth) token ids: each head's top-1, the
    path ``generate`` tries first (the rank-0 candidates ``HeadDrafter`` gives it; path-conditioned heads read
    that path's own tokens) and the one chain an engine that verifies no tree takes (vLLM). ``embeddings`` and
    ``lm_head`` are the base model's."""
    logits = heads.draft_logits(hidden, roots, embeddings, lm_head, depth=depth)[:depth]
    return heads.token_ids(logits.argmax(-1)).T
