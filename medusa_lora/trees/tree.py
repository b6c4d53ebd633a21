"""Token trees: which head top-k candidates are verified together, and the tensors that describe them.

A tree is a list of paths of top-k ranks, as Medusa's ``medusa_choices``: the path ``(0, 2)`` is the node
whose token is head 0's top-1 candidate followed by head 1's top-3 candidate. Node 0 is the root: the
token the base model already chose. Nodes are ordered by depth, then lexicographically, so every
ancestor comes before its descendants.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from medusa_lora.errors import ConfigError

Path = tuple[int, ...]


@dataclass(frozen=True)
class TreeTensors:
    """Per-device tensors of a tree with T nodes (root included) and depth D."""

    head_index: torch.Tensor  # (T-1,) which head proposes node i+1
    rank_index: torch.Tensor  # (T-1,) which top-k rank of that head
    depths: torch.Tensor  # (T,) root = 0
    mask: torch.Tensor  # (T, T) bool: [i, j] = j is an ancestor of i, or i itself
    retrieve: torch.Tensor  # (num_leaves, D + 1) root-to-leaf node indices, padded with 0
    on_path: torch.Tensor  # (num_leaves, D + 1) bool: which entries of ``retrieve`` are real nodes
    parents: torch.Tensor  # (T-1,) parent of node i+1


class TokenTree:
    """An immutable token tree; build it with ``TokenTree(paths)`` or ``calibrated_tree``."""

    def __init__(self, paths: Sequence[Sequence[int]]) -> None:
        clean = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        for path in clean:
            if not path:
                raise ConfigError("a tree path must not be empty (the root is implicit)")
            if min(path) < 0:
                raise ConfigError(f"tree path {path} has a negative top-k rank")
            if len(path) > 1 and path[:-1] not in set(clean):
                raise ConfigError(f"tree path {path} has no parent path {path[:-1]}")
        self.paths: tuple[Path, ...] = tuple(clean)
        self._index = {p: i + 1 for i, p in enumerate(self.paths)}
        self._tensors: dict[torch.device, TreeTensors] = {}
        self._cuts: dict[int, TokenTree] = {}

    def __repr__(self) -> str:
        return f"TokenTree(size={self.size}, depth={self.depth})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenTree) and self.paths == other.paths

    def __hash__(self) -> int:
        return hash(self.paths)

    def __contains__(self, path: object) -> bool:
        """Whether ``path`` (a tuple of ranks) is a node of the tree."""
        return path in self._index

    @property
    def size(self) -> int:
        """Number of nodes, the root included: the tokens verified per step."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        """Longest path below the root: the number of heads the tree needs."""
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_rank(self) -> int:
        """Top-k needed from the heads."""
        return max((p[-1] for p in self.paths), default=-1) + 1

    @cached_property
    def parents(self) -> list[int]:
        return [-1] + [self._index.get(p[:-1], 0) for p in self.paths]

    @cached_property
    def children(self) -> list[list[int]]:
        """Children of each node, in rank order."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for node, parent in enumerate(self.parents[1:], start=1):
            kids[parent].append(node)
        return kids

    def up_to_depth(self, depth: int) -> TokenTree:
        """The subtree of the nodes at depth <= ``depth`` (the root alone for 0), made once per depth."""
        if depth >= self.depth:
            return self
        if depth not in self._cuts:
            self._cuts[depth] = TokenTree([p for p in self.paths if len(p) <= depth])
        return self._cuts[depth]

    def to_list(self) -> list[list[int]]:
        return [list(p) for p in self.paths]

    def tensors(self, device: torch.device | str = "cpu") -> TreeTensors:
        """The tree's index tensors on ``device`` (computed once per device)."""
        device = torch.device(device)
        if device not in self._tensors:
            self._tensors[device] = self._build_tensors(device)
        return self._tensors[device]

    def _build_tensors(self, device: torch.device) -> TreeTensors:
        size = self.size
        mask = torch.eye(size, dtype=torch.bool)
        for node in range(1, size):
            mask[node] |= mask[self.parents[node]]
        leaves = [n for n in range(size) if not self.children[n]]
        retrieve = torch.zeros(len(leaves), self.depth + 1, dtype=torch.long)
        lengths = torch.zeros(len(leaves), dtype=torch.long)
        for row, leaf in enumerate(leaves):
            chain = mask[leaf].nonzero().flatten()  # ancestors in node order == root to leaf
            retrieve[row, : len(chain)] = chain
            lengths[row] = len(chain)
        return TreeTensors(
            head_index=torch.tensor([len(p) - 1 for p in self.paths], dtype=torch.long, device=device),
            rank_index=torch.tensor([p[-1] for p in self.paths], dtype=torch.long, device=device),
            depths=torch.tensor([0] + [len(p) for p in self.paths], dtype=torch.long, device=device),
            mask=mask.to(device),
            retrieve=retrieve.to(device),
            on_path=(torch.arange(self.depth + 1) < lengths[:, None]).to(device),
            parents=torch.tensor(self.parents[1:], dtype=torch.long, device=device),
        )


ROOT_ONLY = TokenTree([])  # the root alone: plain decoding


def calibrated_tree(
    hit_rates: Sequence[Sequence[float]], size: int, max_depth: int | None = None
) -> TokenTree:
    """The tree of ``size`` nodes (root included) with the largest expected accepted length.

    A node's acceptance probability is the product of the hit rates along its path, and never exceeds
    its parent's, so taking nodes best-first from a heap yields the optimal tree (Medusa's greedy
    construction).
    """
    if size < 1:
        raise ConfigError(f"tree size must be >= 1, got {size}")
    depth_limit = len(hit_rates) if max_depth is None else min(max_depth, len(hit_rates))
    chosen: list[Path] = []
    frontier: list[tuple[float, Path, float]] = []  # (-probability, path, its parent's probability)

    def push(path: Path, parent_prob: float) -> None:
        if len(path) <= depth_limit and path[-1] < len(hit_rates[len(path) - 1]):
            prob = parent_prob * hit_rate(hit_rates, len(path) - 1, path[-1])
            heapq.heappush(frontier, (-prob, path, parent_prob))

    push((0,), 1.0)
    while frontier and len(chosen) < size - 1:
        neg_prob, path, parent_prob = heapq.heappop(frontier)
        chosen.append(path)
        push(path[:-1] + (path[-1] + 1,), parent_prob)  # the next sibling
        push(path + (0,), -neg_prob)  # the first child
    return TokenTree(chosen)


def hit_rate(hit_rates: Sequence[Sequence[float]], head: int, rank: int) -> float:
    """``hit_rates[head][rank]``, 0 past the ranks measured."""
    rates = hit_rates[head]
    return float(rates[rank]) if rank < len(rates) else 0.0


# Typical Medusa head top-k hit rates (per head, ranks 0..9), used to shape the default trees.
PRIOR_HIT_RATES: tuple[tuple[float, ...], ...] = tuple(
    tuple(top1 * (0.28**rank if rank else 1.0) for rank in range(10))
    for top1 in (0.72, 0.55, 0.45, 0.38, 0.32)
)


def default_tree(size: int = 16, num_heads: int = 4) -> TokenTree:
    """A default tree of ``size`` nodes for ``num_heads`` heads, built from ``PRIOR_HIT_RATES``."""
    return calibrated_tree(PRIOR_HIT_RATES[:num_heads], size)


def chain_tree(depth: int) -> TokenTree:
    """A single path of top-1 candidates: the cheapest tree, best for very accurate heads."""
    return TokenTree([(0,) * d for d in range(1, depth + 1)])
