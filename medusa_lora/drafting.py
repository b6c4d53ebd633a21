"""Drafters propose the candidate tokens that fill a tree: the Medusa heads, a test oracle, or a model-free
drafter that reads the context (``medusa_lora.suffix``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from medusa_lora.errors import ConfigError
from medusa_lora.heads import MedusaHeads
from medusa_lora.tree import Path, TokenTree


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
class RequestHooks(Protocol):
    """What a drafter that sees whole requests has: ``generate()`` calls ``begin(prompt_ids)`` before the
    first step and ``end(generated)`` after the last (both on the clock)."""

    def begin(self, prompt: Sequence[int]) -> None: ...

    def end(self, generated: Sequence[int]) -> None: ...


@runtime_checkable
class ContextDrafter(Drafter, RequestHooks, Protocol):
    """A drafter that also sees the prompt (``RequestHooks``)."""


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


@runtime_checkable
class TreeDrafter(Protocol):
    """A drafter that shapes the tree itself each step: ``draft(head_logits, generated, tree)`` returns the
    (depth, k) candidates and the tree to verify (``tree``, the step's base tree, changed as it likes; node
    ``path`` holds ``candidates[len(path) - 1, path[-1]]``)."""

    uses_heads: bool

    def draft(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], tree: TokenTree
    ) -> tuple[torch.Tensor, TokenTree]: ...

    def needs_head_logits(self) -> bool:
        """Whether the next ``draft`` reads ``head_logits``: ``generate()`` passes None, and skips the heads'
        forward, when it does not."""
        ...


class HybridDrafter:
    """One verification tree from two sources: the Medusa heads' tree, plus the path a copy drafter (e.g.
    ``SuffixDrafter``: matches in the prompt, the output so far and earlier outputs) proposes.

    The copy path follows the heads' nodes while its tokens agree with theirs, then leaves the heads' tree
    as a chain of up to ``max_copy_tokens`` in all: where the heads guess well (the first tokens) it costs
    nothing extra, and where they guess badly (deep, copied spans such as names and values) the chain goes
    on. A path that agrees with fewer than ``min_agreement`` of the heads' first tokens is dropped, since
    every node costs (on the built-in task 0, 1 and 4 measured alike: docs/benchmarks.md). No copy draft:
    the heads' tree alone. Verification is unchanged, so the output is lossless.

    With ``heads_step_cost`` (the heads' tree's step cost relative to plain decoding, e.g. from
    ``tree_choice.relative_step_cost``) the heads' nodes are left out while they do not pay: when the last
    ``window`` steps drafted with them emitted fewer tokens per step than that cost (task heads on text
    off their task), the next ``probe_every`` steps verify the copy path alone, then the heads are tried
    again. A probe is judged on its first ``probe_window`` steps (a shorter window: a probe that fails costs
    little), and each probe that fails doubles the time left without them, up to ``max_probe_every`` steps, so
    on text where they never pay the probes cost ever less; a window in which they pay resets it.
    """

    uses_heads = True

    def __init__(
        self,
        heads: MedusaHeads,
        copy: ContextDrafter,
        max_copy_tokens: int = 8,
        min_agreement: int = 1,
        heads_step_cost: float | None = None,
        window: int = 8,
        probe_every: int = 32,
        max_probe_every: int = 512,
        probe_window: int = 2,
    ) -> None:
        if max_copy_tokens < 1:
            raise ConfigError(f"max_copy_tokens must be >= 1, got {max_copy_tokens}")
        if min_agreement < 0:
            raise ConfigError(f"min_agreement must be >= 0, got {min_agreement}")
        if min(window, probe_every, probe_window) < 1:
            raise ConfigError(
                f"window, probe_every and probe_window must be >= 1, got {window}, {probe_every}, {probe_window}"
            )
        if max_probe_every < probe_every:
            raise ConfigError(f"max_probe_every ({max_probe_every}) must be >= probe_every ({probe_every})")
        self.heads, self.copy, self.max_copy_tokens = heads, copy, max_copy_tokens
        self.min_agreement, self.heads_step_cost = min_agreement, heads_step_cost
        self.window, self.probe_every, self.max_probe_every = window, probe_every, max_probe_every
        self._judge_after = window  # steps with the heads before they are judged: window, or probe_window
        self._trees: dict[tuple[TokenTree, Path, int], TokenTree] = {}
        self._with_heads: deque[int] = deque(maxlen=window)  # tokens emitted by recent steps with the heads
        self._heads_off_for = 0  # steps left without the heads
        self._off_steps = probe_every  # how long the next spell without them lasts: doubles per failed probe
        self._probe_window = min(probe_window, window)
        self._emitted: int | None = None  # tokens emitted before the last step
        self._last_used_heads = False

    @property
    def heads_in_use(self) -> bool:
        """Whether the last draft included the heads' nodes."""
        return self._last_used_heads

    def begin(self, prompt: Sequence[int]) -> None:
        self._emitted = None
        self.copy.begin(prompt)

    def end(self, generated: Sequence[int]) -> None:
        self.copy.end(generated)

    def needs_head_logits(self) -> bool:
        return self._heads_off_for == 0  # while the heads are left out, their logits go unread

    def draft(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], tree: TokenTree
    ) -> tuple[torch.Tensor, TokenTree]:
        chain = self.copy(None, generated, self.max_copy_tokens, 1)[:, 0]
        self._last_used_heads = self._heads_pay(len(generated))
        if not self._last_used_heads:
            return chain[:, None], self._with_chain(TokenTree([]), (), len(chain), 0)
        if head_logits is None:
            raise ValueError("HybridDrafter drafts with the heads this step: head_logits is None")
        k = tree.max_rank
        heads = self.heads.token_ids(head_logits[: tree.depth].topk(k, dim=-1).indices)
        depth = max(tree.depth, len(chain))
        candidates = torch.zeros(depth, k + 1, dtype=heads.dtype, device=heads.device)
        candidates[: tree.depth, :k] = heads
        candidates[: len(chain), k] = chain.to(heads.device)
        head_tokens = heads.tolist()  # one copy to the host, not a device sync per comparison below
        attach: Path = ()  # the heads' node the chain leaves from: its tokens agree with the chain's
        for token in chain.tolist()[: tree.depth]:
            row = head_tokens[len(attach)]
            ranks = [r for r in range(k) if attach + (r,) in tree and row[r] == token]
            if not ranks:
                break
            attach += (ranks[0],)
        if len(attach) < min(self.min_agreement, len(chain)):  # the heads disagree early: trust them
            return candidates, tree
        return candidates, self._with_chain(tree, attach, len(chain) - len(attach), k)

    def _heads_pay(self, emitted: int) -> bool:
        """Record what the last step emitted; decide whether this step drafts with the heads."""
        if self._emitted is not None and self._last_used_heads:
            self._with_heads.append(emitted - self._emitted)
        self._emitted = emitted
        if self.heads_step_cost is None:
            return True
        if self._heads_off_for > 0:
            self._heads_off_for -= 1
            return False
        recent = self._with_heads
        if len(recent) >= self._judge_after:
            if sum(recent) / len(recent) < self.heads_step_cost:
                recent.clear()
                self._heads_off_for = self._off_steps - 1
                self._off_steps = min(2 * self._off_steps, self.max_probe_every)
                self._judge_after = self._probe_window
                return False
            if len(recent) == self.window:  # they pay over a whole window: a later spell starts short again
                self._off_steps = self.probe_every
        return True

    def _with_chain(self, tree: TokenTree, attach: Path, length: int, column: int) -> TokenTree:
        """``tree`` plus a chain of ``length`` nodes below ``attach``, at rank ``column`` (made once)."""
        if length <= 0:
            return tree
        key = (tree, attach, length)
        if key not in self._trees:
            chain = [attach + (column,) * n for n in range(1, length + 1)]
            self._trees[key] = TokenTree([*tree.paths, *chain])
        return self._trees[key]
