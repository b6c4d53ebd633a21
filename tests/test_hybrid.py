"""HybridDrafter: the heads' tree and a copy drafter's path in one verification tree; lossless greedy output."""

from __future__ import annotations

import random

import pytest
import torch

from medusa_lora.decoding import generate
from medusa_lora.drafting.hybrid import HybridDrafter
from medusa_lora.drafting.suffix import SuffixDrafter
from medusa_lora.errors import ConfigError
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.heads import MedusaHeads
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import TokenTree, default_tree

from conftest import randomize_heads, tiny_llama, tiny_qwen2
from drafters import RowDrafter
from test_generation import hf_greedy, random_prompt

pytestmark = pytest.mark.usefixtures("both_forwards")  # every test on the eager and the static forward


class ChainOracle(RowDrafter):
    """A copy drafter that knows the true continuation and proposes its next ``depth`` tokens."""

    def __init__(self, continuation):
        self.continuation = list(continuation)

    def begin(self, prompt):
        pass

    def end(self, generated):
        pass

    def rows(self, generated, depth, k):
        start = len(generated)
        return torch.tensor(self.continuation[start : start + depth], dtype=torch.long).reshape(-1, 1)


def one_hot_logits(rows: list[list[int]], vocab: int) -> torch.Tensor:
    """Head logits whose top-k at head d are ``rows[d]`` in rank order."""
    logits = torch.zeros(len(rows), vocab)
    for d, tokens in enumerate(rows):
        for rank, token in enumerate(tokens):
            logits[d, token] = 10.0 - rank
    return logits


def test_chain_follows_agreeing_heads_nodes_then_leaves_the_tree():
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=20))
    tree = TokenTree([(0,), (1,), (0, 0), (0, 1)])
    logits = one_hot_logits([[5, 6], [7, 8]], 20)
    # the chain agrees with head 0's top-2 (6) and head 1's top-2 (8) -- but (1, 1) is no node -- so it leaves at (1,)
    drafter = HybridDrafter(heads, ChainOracle([6, 8, 9, 3]), max_copy_tokens=4)
    candidates, hybrid = drafter.draft(logits, [], tree)
    chain = [(1, 2), (1, 2, 2), (1, 2, 2, 2)]
    assert hybrid.paths == TokenTree([*tree.paths, *chain]).paths
    for path in hybrid.paths:
        if path in chain:
            assert candidates[len(path) - 1, path[-1]] == [6, 8, 9, 3][len(path) - 1]
    # a chain that agrees down the heads' tree costs nothing beyond it until it is deeper
    drafter = HybridDrafter(heads, ChainOracle([5, 7, 2]), max_copy_tokens=3)
    candidates, hybrid = drafter.draft(logits, [], tree)
    assert hybrid.paths == TokenTree([*tree.paths, (0, 0, 2)]).paths
    assert candidates[2, 2] == 2
    # a path that contradicts the heads' first tokens is dropped, unless min_agreement=0
    drafter = HybridDrafter(heads, ChainOracle([9, 7, 2]), max_copy_tokens=3)
    assert drafter.draft(logits, [], tree)[1] is tree
    drafter = HybridDrafter(heads, ChainOracle([9, 7, 2]), max_copy_tokens=3, min_agreement=0)
    assert drafter.draft(logits, [], tree)[1].paths == TokenTree([*tree.paths, (2,), (2, 2), (2, 2, 2)]).paths
    # no copy draft: the heads' tree alone
    drafter = HybridDrafter(heads, ChainOracle([]), max_copy_tokens=3)
    assert drafter.draft(logits, [], tree)[1] is tree


def test_bad_settings_are_refused():
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=20))
    with pytest.raises(ConfigError, match="max_copy_tokens"):
        HybridDrafter(heads, SuffixDrafter(), max_copy_tokens=0)
    with pytest.raises(ConfigError, match="min_agreement"):
        HybridDrafter(heads, SuffixDrafter(), min_agreement=-1)
    with pytest.raises(ConfigError, match="window"):
        HybridDrafter(heads, SuffixDrafter(), window=0)
    with pytest.raises(ConfigError, match="probe_window"):
        HybridDrafter(heads, SuffixDrafter(), probe_window=0)
    with pytest.raises(ConfigError, match="max_probe_every"):
        HybridDrafter(heads, SuffixDrafter(), probe_every=8, max_probe_every=4)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_hybrid_greedy_output_equals_transformers_generate(factory):
    rng = random.Random(1)
    base = factory()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    randomize_heads(model, seed=5)
    suffix = SuffixDrafter(
        max_tree_depth=16, min_token_prob=0.0
    )  # shared: it also drafts from earlier outputs
    for i in range(4):
        prompt = random_prompt(rng, low=10) * 2  # repeats: the copy drafter finds matches
        expected = hf_greedy(base, prompt, 40)
        for tree, agreement in ((default_tree(4, 3), 0), (default_tree(12, 3), 1)):
            drafter = HybridDrafter(model.heads, suffix, max_copy_tokens=6, min_agreement=agreement)
            assert generate(model, prompt, 40, tree=tree, drafter=drafter).tokens == expected, (i, tree)


def test_an_exact_copy_chain_is_accepted_past_the_heads_depth():
    base = tiny_llama()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=2))
    prompt = random_prompt(random.Random(2), low=5)
    expected = hf_greedy(base, prompt, 37)
    drafter = HybridDrafter(model.heads, ChainOracle(expected + [0] * 8), max_copy_tokens=6, min_agreement=0)
    out = generate(model, prompt, 37, tree=default_tree(5, 2), drafter=drafter)
    assert out.tokens == expected
    # every step: the 6-token chain plus the base model's own token; 36 tokens after the prefill
    assert out.stats.accepted_lengths == [7] * 5 + [1]


def test_heads_are_left_out_while_they_do_not_pay_then_probed_again():
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=20))
    tree = TokenTree([(0,), (1,), (0, 0)])
    logits = one_hot_logits([[5, 6], [7, 8]], 20)
    drafter = HybridDrafter(
        heads, ChainOracle([9] * 80), 3, heads_step_cost=1.2, window=2, probe_every=3, max_probe_every=6
    )
    drafter.begin([1, 2])
    used, needed, trees, drafts = [], [], [], []
    generated = 1
    for step in range(21):
        needed.append(drafter.needs_head_logits())
        candidates, step_tree = drafter.draft(logits if needed[-1] else None, [0] * generated, tree)
        used.append(drafter.heads_in_use)
        trees.append(step_tree)
        drafts.append(candidates)
        generated += 3 if step in (13, 14) else 1  # the heads pay (for their 1.2x tree) on steps 13-14 only
    # 2 steps with the heads (the window), 3 without (the copy path alone), a failed probe of 2, then 6
    # without (doubled, and capped at 6); on steps 13-14 they pay, so they stay until a window fails again
    # (steps 15-16), and the next spell without them is short again (3)
    on, off = [True], [False]
    assert used == on * 2 + off * 3 + on * 2 + off * 6 + on * 4 + off * 3 + on
    # the logits are needed except on the steps already known to be without the heads
    assert [u or (i > 0 and used[i - 1]) for i, u in enumerate(used)] == needed
    # the first judgement takes a whole window (4); a probe is judged after probe_window steps (1)
    short = HybridDrafter(
        heads,
        ChainOracle([9] * 80),
        3,
        heads_step_cost=1.2,
        window=4,
        probe_every=3,
        max_probe_every=6,
        probe_window=1,
    )
    short.begin([1, 2])
    probed = []
    for step in range(16):
        short.draft(logits if short.needs_head_logits() else None, [0] * (step + 1), tree)
        probed.append(short.heads_in_use)
    assert probed == on * 4 + off * 3 + on + off * 6 + on + off
    chain_only = trees[2]
    assert chain_only.paths == ((0,), (0, 0), (0, 0, 0))  # the copy path alone, from the root
    assert drafts[2].shape[1] == 1 and (drafts[2][:, 0] == 9).all()
    # without a cost the heads are always used; when they pay they stay
    always = HybridDrafter(heads, ChainOracle([9] * 50), 3)
    paying = HybridDrafter(heads, ChainOracle([9] * 50), 3, heads_step_cost=1.2, window=2)
    for drafter in (always, paying):
        drafter.begin([1])
        for step in range(1, 8):
            drafter.draft(logits, [0] * (3 * step), tree)  # 3 tokens per step
            assert drafter.heads_in_use


class FixedChain(ChainOracle):
    """A copy drafter that proposes the same path every step, and counts its calls."""

    calls = 0

    def rows(self, generated, depth, k):
        self.calls += 1
        return torch.tensor(self.continuation[:depth], dtype=torch.long).reshape(-1, 1)


@pytest.mark.parametrize("accepted", [False, True])
def test_copy_nodes_outside_the_heads_tree_are_left_out_while_too_few_are_accepted(accepted):
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=20))
    tree = TokenTree([(0,), (0, 0)])  # 2 nodes: at 1.2x a plain step, a node costs 0.1 of one
    logits = one_hot_logits([[5], [7]], 20)
    drafter = HybridDrafter(
        heads, FixedChain([5, 7, 9, 9]), 4, heads_step_cost=1.2, window=2, probe_every=3, max_probe_every=6
    )
    drafter.begin([1, 2])
    # each step the heads' 5, 7 are accepted, the path's 9, 9 after them too or not, then the model's token
    step_tokens = [5, 7, 9, 9, 3] if accepted else [5, 7, 3]
    generated, with_copy = [3], []
    for _ in range(14):
        _, step_tree = drafter.draft(logits, generated, tree)
        assert drafter.heads_in_use  # the heads pay: 3 or 5 tokens a step for a 1.2x step
        with_copy.append(step_tree.size > tree.size)
        generated = generated + (step_tokens if with_copy[-1] else [5, 7, 3])
    if accepted:
        assert all(with_copy) and drafter.copy.calls == 14
    else:  # judged after a window of 2, left out 3 steps, a failed probe of 2, then 6 steps without
        on, off = [True], [False]
        assert with_copy == on * 2 + off * 3 + on * 2 + off * 6 + on
        assert (
            drafter.copy.calls == 14 - 7
        )  # not asked during the spells without it (after each judging step)


def test_a_new_request_starts_with_the_copy_path_on_and_keeps_the_heads_judgement():
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=8, vocab_size=20))
    tree = TokenTree([(0,), (0, 0)])
    logits = one_hot_logits([[5], [7]], 20)
    drafter = HybridDrafter(
        heads, FixedChain([5, 7, 9, 9]), 4, heads_step_cost=1.2, window=2, probe_every=8, max_probe_every=64
    )

    def request(step_tokens: list[int], steps: int) -> list[tuple[bool, bool]]:
        """(heads used, copy path outside their tree) per step of a request emitting ``step_tokens`` a step."""
        drafter.begin([1, 2])
        generated, used = [3], []
        for _ in range(steps):
            _, step_tree = drafter.draft(logits if drafter.needs_head_logits() else None, generated, tree)
            used.append((drafter.heads_in_use, step_tree.size > tree.size))
            generated = generated + step_tokens
        return used

    # a request where the path's 9, 9 are never accepted: it is left out after the window of 2 steps
    assert [copy for _, copy in request([5, 7, 3], 4)] == [True, True, False, False]
    # the next request repeats itself (a loop the path drafts): the path is on from its first step
    assert [copy for _, copy in request([5, 7, 9, 9, 3], 3)] == [True, True, True]
    # the heads' gate is not reset: heads that stopped paying stay left out in the next request
    assert [heads for heads, _ in request([3], 4)] == [True, True, False, False]
    assert [heads for heads, _ in request([3], 2)] == [False, False]


def test_adaptive_hybrid_keeps_greedy_output():
    base = tiny_llama()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    randomize_heads(model, seed=7)
    rng = random.Random(4)
    drafter = HybridDrafter(
        model.heads, SuffixDrafter(min_token_prob=0.0), 4, heads_step_cost=2.5, window=3, probe_every=4
    )
    draft_logits, calls = model.draft_logits, []
    model.draft_logits = lambda *args, **kwargs: calls.append(1) or draft_logits(*args, **kwargs)
    steps = 0
    for _ in range(3):
        prompt = random_prompt(rng, low=10)
        out = generate(model, prompt, 40, tree=default_tree(8, 3), drafter=drafter)
        assert out.tokens == hf_greedy(base, prompt, 40)
        steps += out.stats.steps
    assert len(calls) < steps  # the heads' forward is skipped on steps drafted without them
