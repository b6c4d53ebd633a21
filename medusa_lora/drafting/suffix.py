"""Suffix decoding (Oliaro et al., arXiv 2411.04975): model-free drafts from suffix trees.

Two depth-limited suffix tries count every substring of up to ``max_tree_depth`` tokens: one over the
current request (prompt + tokens generated so far), one over the outputs of earlier requests made with the
same drafter. Each step matches the context's recent suffixes against both, and follows the most frequent
continuation while its estimated probability (the product of child count / parent count along the path)
stays >= ``min_token_prob``. The draft may be at most ``max_spec_factor`` x the match length long (the
paper's adaptive speculation length) and the tree's depth; of the drafts from all
match lengths and both tries the one with the highest score (the sum of its tokens' probabilities) wins,
as in Arctic Inference's implementation. No match: no draft, and the step verifies the root alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from medusa_lora.drafting.drafter import Drafter, cut_to_rows
from medusa_lora.errors import ConfigError
from medusa_lora.trees.tree import TokenTree


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0  # occurrences of the substring that ends here
        self.children: dict[int, _Node] = {}


class SuffixTrie:
    """Occurrence counts of every substring of up to ``max_depth`` tokens of the sequences added to it."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node()

    def writer(self) -> Callable[[Iterable[int]], None]:
        """A function that appends tokens to one new sequence in the trie (O(max_depth) per token)."""
        active: list[_Node] = []  # the nodes of this sequence's suffixes still shorter than max_depth

        def extend(tokens: Iterable[int]) -> None:
            for token in tokens:
                self.root.count += 1
                active.append(self.root)
                for i, node in enumerate(active):
                    child = node.children.get(token)
                    if child is None:
                        child = node.children[token] = _Node()
                    child.count += 1
                    active[i] = child
                if len(active) == self.max_depth:
                    del active[0]

        return extend

    def add(self, tokens: Iterable[int]) -> None:
        """Add one whole sequence."""
        self.writer()(tokens)

    def speculate(
        self, context: Sequence[int], max_tokens: int, max_spec_factor: float, min_token_prob: float
    ) -> tuple[list[int], float]:
        """The best draft after ``context`` over all match lengths, and its score (0 when none)."""
        best: list[int] = []
        best_score = 0.0
        for match_len in range(1, min(len(context), self.max_depth) + 1):
            node = self._find(context[-match_len:])
            if node is None:
                break  # no longer suffix can match either
            limit = min(max_tokens, int(match_len * max_spec_factor + 1e-6))
            draft, score = _follow(node, limit, min_token_prob)
            if draft and score >= best_score:
                best, best_score = draft, score
        return best, best_score

    def _find(self, pattern: Sequence[int]) -> _Node | None:
        node = self.root
        for token in pattern:
            node = node.children.get(token)
            if node is None:
                return None
        return node


def _follow(node: _Node, limit: int, min_token_prob: float) -> tuple[list[int], float]:
    """Walk the most frequent children from ``node``: up to ``limit`` tokens, each probable enough."""
    draft: list[int] = []
    prob, score = 1.0, 0.0
    while len(draft) < limit and node.children:
        token, child = max(node.children.items(), key=lambda item: item[1].count)
        prob *= child.count / node.count
        if prob < min_token_prob:
            break
        draft.append(token)
        score += prob
        node = child
    return draft, score


class SuffixDrafter(Drafter):
    """Suffix decoding as a ``Drafter`` for chain trees (``chain_tree(depth)``): the most frequent continuation
    of the context's recent suffixes seen in this request or in earlier outputs (each request's output joins
    them at ``end``)."""

    def __init__(
        self, max_tree_depth: int = 24, max_spec_factor: float = 1.0, min_token_prob: float = 0.1
    ) -> None:
        if max_tree_depth < 2:
            raise ConfigError(f"max_tree_depth must be >= 2, got {max_tree_depth}")
        if max_spec_factor <= 0:
            raise ConfigError(f"max_spec_factor must be > 0, got {max_spec_factor}")
        if not 0 <= min_token_prob <= 1:
            raise ConfigError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        self.max_tree_depth, self.max_spec_factor, self.min_token_prob = (
            max_tree_depth,
            max_spec_factor,
            min_token_prob,
        )
        self.outputs = SuffixTrie(max_tree_depth)
        self._request = SuffixTrie(max_tree_depth)
        self._extend = self._request.writer()
        self._context: list[int] = []
        self._seen = 0

    def begin(self, prompt: Sequence[int]) -> None:
        """Start a request: index its prompt."""
        self._request = SuffixTrie(self.max_tree_depth)
        self._extend = self._request.writer()
        self._context = list(prompt)
        self._seen = 0
        self._extend(self._context)

    def end(self, generated: Sequence[int]) -> None:
        """Finish a request: its output joins the earlier outputs."""
        self.outputs.add(generated)

    def draft(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], tree: TokenTree
    ) -> tuple[torch.Tensor, TokenTree]:
        if tree.max_rank > 1:
            raise ConfigError(
                f"suffix decoding proposes one path: use a chain tree, not one with top-{tree.max_rank}"
            )
        draft = self.propose(generated, tree.depth)
        return cut_to_rows(torch.tensor(draft, dtype=torch.long).reshape(-1, 1), tree)

    def propose(self, generated: Sequence[int], max_tokens: int) -> list[int]:
        """The draft after the prompt and ``generated`` (the request's tokens so far, of which those not seen yet
        are indexed now): up to ``max_tokens`` tokens, from this request or the earlier outputs."""
        new = generated[self._seen :]
        self._seen = len(generated)
        self._extend(new)
        self._context.extend(new)
        context = self._context[-self.max_tree_depth :]
        args = (max_tokens, self.max_spec_factor, self.min_token_prob)
        local, local_score = self._request.speculate(context, *args)
        cached, cached_score = self.outputs.speculate(context, *args)
        return local if local_score >= cached_score else cached
