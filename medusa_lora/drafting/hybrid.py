"""Two drafters in one tree: the Medusa heads' tree, plus the chain a copy drafter (suffix decoding) proposes,
each kept only while it pays for its nodes (``PayGate``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from medusa_lora.drafting.drafter import Drafter
from medusa_lora.drafting.heads import HeadDrafter
from medusa_lora.errors import ConfigError
from medusa_lora.model.heads import MedusaHeads
from medusa_lora.trees.tree import Path, TokenTree, chain_tree


class PayGate:
    """Whether a drafting option pays for what it costs, judged on the recent steps that used it: their gain
    per unit of cost (``record``) against a threshold (``step``). When it falls short the option is left out
    for ``probe_every`` steps, then tried again; a probe is judged on its first ``probe_window`` steps, and each
    failed probe doubles the spell without it, up to ``max_probe_every`` steps (so where it never pays the
    probes cost ever less); a whole window that pays makes the next spell short again."""

    def __init__(self, window: int, probe_every: int, max_probe_every: int, probe_window: int) -> None:
        self.window, self.probe_every, self.max_probe_every = window, probe_every, max_probe_every
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)  # (gain, cost) of recent steps
        self._judge_after = window  # steps with the option before it is judged: window, or probe_window
        self._probe_window = min(probe_window, window)
        self._off_for = 0  # steps left without the option
        self._off_steps = probe_every  # how long the next spell without it lasts: doubles per failed probe

    @property
    def closed(self) -> bool:
        """Whether the next step is already known to go without the option."""
        return self._off_for > 0

    def record(self, gain: float, cost: float) -> None:
        """A step that used the option: what it brought and what it cost."""
        self._recent.append((gain, cost))

    def step(self, threshold: float) -> bool:
        """Start a step (a command: it moves the spell on): whether the step uses the option. It does unless it
        is left out, or its recent gain per unit of cost is below ``threshold``."""
        if self._off_for > 0:
            self._off_for -= 1
            return False
        recent = self._recent
        if len(recent) >= self._judge_after:
            cost = sum(c for _, c in recent)
            if cost > 0 and sum(g for g, _ in recent) / cost < threshold:
                recent.clear()
                self._off_for = self._off_steps - 1
                self._off_steps = min(2 * self._off_steps, self.max_probe_every)
                self._judge_after = self._probe_window
                return False
            if len(recent) == self.window:  # it pays over a whole window: a later spell starts short again
                self._off_steps = self.probe_every
        return True


class HybridDrafter(Drafter):
    """One verification tree from two sources: the Medusa heads' tree, plus the path a copy drafter (e.g.
    ``SuffixDrafter``: matches in the prompt, the output so far and earlier outputs) proposes.

    The copy path follows the heads' nodes while its tokens agree with theirs, then leaves the heads' tree
    as a chain of up to ``max_copy_tokens`` in all: where the heads guess well (the first tokens) it costs
    nothing extra, and where they guess badly (deep, copied spans such as names and values) the chain goes
    on. A path that agrees with fewer than ``min_agreement`` of the heads' first tokens is dropped, since
    every node costs. No copy draft: the heads' tree alone. Verification is unchanged, so the output is lossless.

    With ``heads_step_cost`` (the heads' tree's step cost relative to plain decoding, e.g. from
    ``trees.choice.relative_step_cost``) two ``PayGate``s weigh what each source brings against what it costs,
    over the last ``window`` steps that used it:
    - the heads' nodes are left out while the steps drafted with them emit fewer tokens per step than that cost
      (task heads on text off their task): those steps verify the copy path alone;
    - the copy path's nodes outside the heads' tree are left out while too few of them are accepted: each costs
      ``c = (heads_step_cost - 1) / (nodes - 1)`` of a plain step (the heads' tree's cost spread over its nodes
      after the root), and adding nodes raises tokens per unit of time only when they are accepted at a rate
      of at least ``T * c / heads_step_cost`` (``T``: the recent tokens per step with the heads).
    ``probe_every``, ``max_probe_every`` and ``probe_window`` say when a source left out is tried again
    (``PayGate``). The heads' gate keeps its judgement from request to request (task heads off their task stay
    off), the copy path's starts afresh with each request: what a copy drafter finds (a repeat, a loop, a span
    copied from the prompt) belongs to one request, and a spell without the path carried over from earlier
    requests missed the loops of later ones.
    """

    uses_heads = True

    def __init__(
        self,
        heads: MedusaHeads,
        copy: Drafter,
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
        self.copy, self.max_copy_tokens = copy, max_copy_tokens
        self._heads, self._copy_tree = HeadDrafter(heads), chain_tree(max_copy_tokens)
        self.min_agreement, self.heads_step_cost = min_agreement, heads_step_cost
        self._gate_settings = (window, probe_every, max_probe_every, probe_window)
        self._heads_gate = PayGate(*self._gate_settings)
        self._copy_gate = PayGate(*self._gate_settings)
        self._trees: dict[tuple[TokenTree, Path, int], TokenTree] = {}
        self._emitted: int | None = None  # tokens emitted before the last step
        self._last_used_heads = False
        # the last step's copy path: its tokens, how many lie inside the heads' tree, how many outside
        self._last_copy: tuple[list[int], int, int] | None = None
        self._tokens_per_step = 1.0  # a running mean over the steps drafted with the heads

    @property
    def heads_in_use(self) -> bool:
        """Whether the last draft included the heads' nodes."""
        return self._last_used_heads

    def begin(self, prompt: Sequence[int]) -> None:
        self._emitted, self._last_copy = None, None
        self._copy_gate = PayGate(*self._gate_settings)  # a new request: the copy path starts on
        self.copy.begin(prompt)

    def end(self, generated: Sequence[int]) -> None:
        self.copy.end(generated)

    def needs_head_logits(self) -> bool:
        return not self._heads_gate.closed  # while the heads are left out, their logits go unread

    def draft(
        self, head_logits: torch.Tensor | None, generated: Sequence[int], tree: TokenTree
    ) -> tuple[torch.Tensor, TokenTree]:
        self._record(generated)
        cost = self.heads_step_cost
        self._last_used_heads = cost is None or self._heads_gate.step(cost)
        if self._last_used_heads and self._copy_gate.closed:
            self._use_copy_path(tree)  # a step of a spell without the path: the copy drafter is not asked
            chain = torch.zeros(0, dtype=torch.long)
        else:
            chain = self.copy.draft(None, generated, self._copy_tree)[0][:, 0]
        if not self._last_used_heads:
            return chain[:, None], self._with_chain(TokenTree([]), (), len(chain), 0)
        if head_logits is None:
            raise ValueError("HybridDrafter drafts with the heads this step: head_logits is None")
        k = tree.max_rank
        heads = self._heads.draft(head_logits, generated, tree)[0]
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
        outside = len(chain) - len(attach)
        if len(attach) < min(self.min_agreement, len(chain)):  # the heads disagree early: trust them
            return candidates, tree
        if outside > 0 and not self._use_copy_path(tree):
            return candidates, tree
        self._last_copy = (chain.tolist(), len(attach), outside) if outside > 0 else None
        return candidates, self._with_chain(tree, attach, outside, k)

    def _record(self, generated: Sequence[int]) -> None:
        """What the last step emitted: tokens per step with the heads, and how many of the copy path's nodes
        outside the heads' tree it accepted (the emitted tokens before the model's own that follow the path)."""
        emitted = len(generated)
        if self._emitted is not None:
            new = generated[self._emitted :]
            if self._last_used_heads:
                self._heads_gate.record(len(new), 1)
                self._tokens_per_step += (len(new) - self._tokens_per_step) / 8
            if self._last_copy is not None:
                path, inside, outside = self._last_copy
                followed = 0
                for token, drafted in zip(new[:-1], path):
                    if token != drafted:
                        break
                    followed += 1
                self._copy_gate.record(max(0, followed - inside), outside)
        self._emitted, self._last_copy = emitted, None

    def _use_copy_path(self, tree: TokenTree) -> bool:
        """Take this step through the copy path's gate (``PayGate.step``): whether it adds the path's nodes
        outside the heads' tree. A node pays when it is accepted at least ``tokens per step x node cost / step
        cost`` times."""
        cost = self.heads_step_cost
        if cost is None or tree.size <= 1:
            return True
        node_cost = max(cost - 1, 0.0) / (tree.size - 1)
        return self._copy_gate.step(self._tokens_per_step * node_cost / cost)

    def _with_chain(self, tree: TokenTree, attach: Path, length: int, column: int) -> TokenTree:
        """``tree`` plus a chain of ``length`` nodes below ``attach``, at rank ``column`` (made once)."""
        if length <= 0:
            return tree
        key = (tree, attach, length)
        if key not in self._trees:
            chain = [attach + (column,) * n for n in range(1, length + 1)]
            self._trees[key] = TokenTree([*tree.paths, *chain])
        return self._trees[key]
