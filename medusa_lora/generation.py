"""The step functions of speculative decoding, shared by ``generate()`` (``decoding``) and tree tuning
(``trees.tuning``): ``prefill`` the prompt, ``draft`` a step's tree, ``verify`` it.

A step: the heads read the hidden state of the last accepted token and the root (the model's own next
token, chosen but not yet in the cache); a drafter fills the tree; one decoder forward scores every node,
each attending to the prefix and its ancestors; verification keeps the longest accepted path; the cache
keeps the prefix and that path. The root-only tree is plain incremental decoding on the same code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medusa_lora.drafting.drafter import Drafter
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import ROOT_ONLY, TokenTree
from medusa_lora.verification.forward import DecoderForward, EagerForward
from medusa_lora.verification.verify import greedy_verify

# (tokens (T,), logits (T, V), tree) -> (accepted node indices from the root down, the model's next token)
Accept = Callable[[torch.Tensor, torch.Tensor, TokenTree], tuple[torch.Tensor, int]]


@dataclass
class DecodeState:
    """Where decoding stands: ``forward``'s cache holds ``prefix_len`` tokens, ``hidden`` (H,) is the last one's
    hidden state and ``root`` the model's token after it (emitted, not yet in the cache)."""

    forward: DecoderForward
    prefix_len: int
    hidden: torch.Tensor
    root: int


def prefill(
    model: MedusaLoraModel,
    input_ids: torch.Tensor,
    choose: Callable[[torch.Tensor], int],
    forward: DecoderForward | None = None,
) -> DecodeState:
    """Run the prompt (1, P) into ``forward``'s cache (default: a new ``EagerForward``); ``choose(logits (V,))``
    picks the first token, the first root."""
    forward = forward if forward is not None else EagerForward(model)
    hidden, logits = forward.prefill(input_ids)
    return DecodeState(forward, input_ids.shape[1], hidden.clone(), choose(logits))


def draft(
    model: MedusaLoraModel,
    drafter: Drafter | None,
    tree: TokenTree,
    state: DecodeState,
    generated: Sequence[int],
) -> tuple[torch.Tensor, TokenTree]:
    """The step's tokens (T,), root first, then node ``path``'s candidate ``candidates[len(path) - 1, path[-1]]``;
    and the tree they fill (``Drafter.draft`` may cut or grow it). The heads run only when the drafter reads
    them; the root-only tree (or no drafter) drafts nothing."""
    root = torch.tensor([state.root], device=model.device)
    if tree.size == 1 or drafter is None:
        return root, ROOT_ONLY
    head_logits = (
        model.draft_logits(state.hidden, state.root, depth=tree.depth)
        if drafter.needs_head_logits()
        else None
    )
    candidates, tree = drafter.draft(head_logits, generated, tree)
    if tree.size == 1:
        return root, tree
    tensors = tree.tensors(model.device)
    return torch.cat([root, candidates.to(model.device)[tensors.head_index, tensors.rank_index]]), tree


def verify(
    state: DecodeState,
    tokens: torch.Tensor,
    tree: TokenTree,
    accept: Accept = greedy_verify,
) -> list[int]:
    """Score the tree's ``tokens`` (T,) in one forward after the cached prefix (positions by depth, tree
    attention), ``accept`` a path, keep it in the cache and advance ``state`` past it; returns the tokens
    emitted: the accepted drafts, then the model's own next token (the new root)."""
    hidden, logits = state.forward.score(tokens, tree, state.prefix_len)
    accepted, root = accept(tokens, logits, tree)
    state.forward.keep(state.prefix_len, accepted)
    state.prefix_len += len(accepted)
    state.hidden, state.root = hidden[accepted[-1]].clone(), root
    return tokens[accepted[1:]].tolist() + [root]


def __getattr__(name: str):
    """``from medusa_lora.generation import generate`` of the flat layout: ``generate()`` lives in ``decoding``."""
    if name in ("generate", "GenerationOutput", "GenerationStats", "eos_token_ids"):
        from medusa_lora import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'medusa_lora.generation' has no attribute {name!r}")
