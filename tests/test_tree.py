"""Token trees: masks, paths, calibrated trees."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_lora.errors import ConfigError
from medusa_lora.trees.choice import parse_tree_spec
from medusa_lora.trees.tree import PRIOR_HIT_RATES, TokenTree, calibrated_tree, chain_tree, default_tree
from medusa_lora.trees.walk import expected_accepted_length

from drafters import RowDrafter


@st.composite
def random_trees(draw, max_nodes: int = 40, max_depth: int = 5, max_rank: int = 6) -> TokenTree:
    paths: set[tuple[int, ...]] = set()
    for _ in range(draw(st.integers(0, max_nodes))):
        parent = draw(st.sampled_from(sorted([()] + sorted(p for p in paths if len(p) < max_depth))))
        paths.add(parent + (draw(st.integers(0, max_rank)),))
    return TokenTree(sorted(paths))


def ancestors(tree: TokenTree, node: int) -> set[int]:
    out = {node}
    while tree.parents[node] >= 0:
        node = tree.parents[node]
        out.add(node)
    return out


@settings(max_examples=60, deadline=None)
@given(random_trees())
def test_each_node_sees_exactly_its_ancestors(tree):
    mask = tree.tensors().mask
    for node in range(tree.size):
        assert set(mask[node].nonzero().flatten().tolist()) == ancestors(tree, node)


@settings(max_examples=60, deadline=None)
@given(random_trees())
def test_paths_cover_every_node_from_the_root(tree):
    t = tree.tensors()
    covered = set()
    for row, on in zip(t.retrieve.tolist(), t.on_path.tolist()):
        path = [n for n, keep in zip(row, on) if keep]
        assert path[0] == 0
        for parent, child in itertools.pairwise(path):
            assert tree.parents[child] == parent
        assert not tree.children[path[-1]]  # ends at a leaf
        covered |= set(path)
    assert covered == set(range(tree.size))
    assert t.depths.tolist() == [0] + [len(p) for p in tree.paths]
    assert all(tree.parents[n] < n for n in range(1, tree.size))  # ancestors come first


def test_invalid_trees_are_refused():
    with pytest.raises(ConfigError, match="no parent"):
        TokenTree([(0,), (1, 0)])
    with pytest.raises(ConfigError, match="negative"):
        TokenTree([(-1,)])
    with pytest.raises(ConfigError, match="empty"):
        TokenTree([()])


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_default_trees_have_the_requested_size(size):
    tree = default_tree(size, num_heads=4)
    assert tree.size == size and tree.depth <= 4


def brute_force_best(hit_rates, size):
    """Best expected accepted length over every valid tree with `size` nodes (tiny cases only)."""
    candidates = [
        p for d in range(1, len(hit_rates) + 1) for p in itertools.product(range(len(hit_rates[0])), repeat=d)
    ]
    best = 0.0
    for combo in itertools.combinations(candidates, size - 1):
        chosen = set(combo)
        if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
            best = max(best, expected_accepted_length(TokenTree(combo), hit_rates))
    return best


@pytest.mark.parametrize("size", [2, 3, 4, 5, 6])
@pytest.mark.parametrize(
    "hit_rates", [[[0.6, 0.2, 0.1], [0.5, 0.3, 0.05]], [[0.3, 0.3, 0.2], [0.9, 0.05, 0.0]]]
)
def test_calibrated_tree_is_optimal(hit_rates, size):
    tree = calibrated_tree(hit_rates, size)
    assert tree.size == size
    assert expected_accepted_length(tree, hit_rates) == pytest.approx(brute_force_best(hit_rates, size))


def test_calibrated_tree_follows_the_hit_rates():
    sharp = calibrated_tree([[0.99, 0.001], [0.99, 0.001], [0.99, 0.001]], 4)
    assert sharp == chain_tree(3)  # accurate heads: a chain
    flat = calibrated_tree([[0.3, 0.3, 0.3], [0.05, 0.0, 0.0]], 4)
    assert flat == TokenTree([(0,), (1,), (2,)])  # unsure first head: a wide first level
    assert expected_accepted_length(default_tree(64), PRIOR_HIT_RATES) > expected_accepted_length(
        default_tree(8), PRIOR_HIT_RATES
    )


def test_tree_tensors_are_cached_per_device():
    tree = default_tree(16)
    assert tree.tensors("cpu") is tree.tensors(torch.device("cpu"))


def test_calibrated_tree_accepts_zero_hit_rates():
    tree = calibrated_tree([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], 5)
    assert tree.size == 5 and (0,) in tree.paths


def test_auto_tree_trades_acceptance_against_step_cost(monkeypatch):
    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.model.wrapper import MedusaLoraModel
    from medusa_lora.trees import choice as tree_choice
    from medusa_lora.trees.tuning import StepCost

    from conftest import tiny_llama

    def auto_tree(cost_by_size, rates=((0.9, 0.05), (0.8, 0.05), (0.7, 0.05))):
        model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=3))
        model.config.hit_rates = [list(r) for r in rates]
        costs = lambda model, trees: {t: StepCost(0.0, cost_by_size.get(t.size, 99.0)) for t in trees}
        monkeypatch.setattr(tree_choice, "measure_step_costs", costs)
        return tree_choice.choose_tree(model, "auto").tree

    assert auto_tree({n: 1.0 for n in range(1, 16)}).size == 15  # free nodes: the biggest tree (all 14 paths)
    steep = {1: 1.0, 2: 1.5, 3: 2.9, 4: 3.0, 8: 9.0}
    assert auto_tree(steep) == chain_tree(1)  # 1.9 tokens for 1.5x the cost wins
    bumpy = {1: 1.0, 2: 1.8, 3: 2.5, 4: 1.9, 8: 9.0}
    assert auto_tree(bumpy) == chain_tree(3)  # 4 nodes cost less than 3 here
    assert auto_tree(steep, rates=((0.1,), (0.1,), (0.1,))).size == 1  # speculation does not pay: plain
    rates = [[0.9, 0.05], [0.8, 0.05], [0.7, 0.05]]
    four, eight = (expected_accepted_length(calibrated_tree(rates, n), rates) for n in (4, 8))
    for slower, winner in ((0.98, 8), (0.95, 4)):  # within 3% of the fastest: a tie, the larger tree wins
        near = {1: 1.0, 2: 9.0, 3: 9.0, 4: four / 2.0, 8: eight / (slower * 2.0)}
        assert auto_tree(near).size == winner


class RatedOracleDrafter(RowDrafter):
    """Puts the true token at depth d at rank r with probability ``rates[d][r]`` (at most one rank, each
    depth and step independent), other ranks hold wrong tokens: its hit rates are known by construction."""

    def __init__(self, continuation, vocab_size, rates, seed):
        self.continuation, self.vocab_size, self.rates = list(continuation), vocab_size, rates
        self.rng = random.Random(seed)

    def rows(self, generated, depth, k):
        out = torch.empty(depth, k, dtype=torch.long)
        for d in range(depth):
            true = self.continuation[len(generated) + d]
            out[d] = (true + 1 + torch.arange(k)) % self.vocab_size
            draw, total = self.rng.random(), 0.0
            for rank, rate in enumerate(self.rates[d][:k]):
                total += rate
                if draw < total:
                    out[d, rank] = true
                    break
        return out


RATES = [[0.55, 0.25, 0.1], [0.7, 0.15], [0.6, 0.2]]


def test_predicted_tokens_per_step_matches_simulated_verification():
    """Many greedy verification steps of drafts with known hit rates: tokens per step as generate() counts
    them (the accepted drafts plus the base model's own token) average to the prediction."""
    from medusa_lora.verification.verify import greedy_verify

    vocab, sentinel = 50, 49  # the argmax after a wrong token: never drafted
    tree = calibrated_tree(RATES, 10)
    tensors = tree.tensors()
    rng = random.Random(0)
    emitted, steps = 0, 1500
    for seed in range(steps):
        truth = [rng.randrange(vocab - 1) for _ in range(tree.depth + 2)]
        drafter = RatedOracleDrafter(truth, vocab - 1, RATES, seed)
        candidates = drafter.rows([truth[0]], tree.depth, tree.max_rank)
        tokens = torch.cat([torch.tensor(truth[:1]), candidates[tensors.head_index, tensors.rank_index]])
        right = [True]
        for node, path in enumerate(tree.paths, start=1):
            right.append(bool(right[tree.parents[node]] and tokens[node] == truth[len(path)]))
        paths = [(), *tree.paths]
        argmax = torch.tensor([truth[len(p) + 1] if ok else sentinel for p, ok in zip(paths, right)])
        accepted, _ = greedy_verify(tokens, torch.nn.functional.one_hot(argmax, vocab).float(), tree)
        emitted += len(accepted)
    assert emitted / steps == pytest.approx(expected_accepted_length(tree, RATES), rel=0.03)  # s.e. ~0.9%


def test_predicted_tokens_per_step_matches_generation():
    from medusa_lora.decoding import generate
    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.model.wrapper import MedusaLoraModel
    from medusa_lora.trees.tuning import predicted_tokens_per_step

    from conftest import TINY_VOCAB, tiny_llama

    model = MedusaLoraModel.from_base(tiny_llama(seed=8), MedusaConfig(num_heads=3))
    tree = calibrated_tree(RATES, 10)
    assert predicted_tokens_per_step(model, tree) is None  # no hit rates measured
    model.config.hit_rates = RATES
    predicted = predicted_tokens_per_step(model, tree)
    assert predicted == expected_accepted_length(tree, RATES) == pytest.approx(2.9555)
    assert predicted_tokens_per_step(model, chain_tree(0)) == 1
    assert predicted_tokens_per_step(model, chain_tree(6)) is None  # deeper than the heads
    prompt, n = [3, 1, 4], 120
    continuation = generate(model, prompt, max_new_tokens=n + tree.depth, speculative=False).tokens
    realised = []
    for seed in range(2):
        drafter = RatedOracleDrafter(continuation, TINY_VOCAB, RATES, seed)
        out = generate(model, prompt, max_new_tokens=n, tree=tree, drafter=drafter)
        assert out.tokens == continuation[:n]
        realised += out.stats.accepted_lengths[:-1]  # the last step is cut short by max_new_tokens
    assert sum(realised) / len(realised) == pytest.approx(predicted, rel=0.12)  # s.e. ~4%; off by one: 34%


def test_step_costs_are_measured_warm_repeatedly_and_interleaved():
    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.model.wrapper import MedusaLoraModel
    from medusa_lora.trees.tuning import measure_step_costs

    from conftest import tiny_llama

    model = MedusaLoraModel.from_base(tiny_llama(seed=3), MedusaConfig(num_heads=3))
    events = []
    model.heads.register_forward_hook(lambda *_: events.append("heads"))
    model.decoder.embed_tokens.register_forward_hook(lambda *_: events.append("decoder"))  # every forward
    trees = [TokenTree([]), chain_tree(2), calibrated_tree(RATES, 6)]
    costs = measure_step_costs(model, trees, prefix_len=16, repeats=3)
    assert list(costs) == trees
    assert costs[trees[0]].draft == 0 and costs[trees[0]].verify > 0  # plain decoding drafts nothing
    assert all(costs[t].draft > 0 and costs[t].total == costs[t].draft + costs[t].verify for t in trees[1:])
    # the prefill, then a warm-up round and 3 measured rounds, each drafting with the heads before every tree
    assert events == ["decoder"] + ["decoder", "heads", "decoder", "heads", "decoder"] * 4


def test_step_costs_keep_each_parts_fastest_round(monkeypatch):
    from medusa_lora.model.config import MedusaConfig
    from medusa_lora.model.wrapper import MedusaLoraModel
    from medusa_lora.trees import tuning as tree_tuning

    from conftest import tiny_llama

    model = MedusaLoraModel.from_base(tiny_llama(seed=3), MedusaConfig(num_heads=3))
    trees = [TokenTree([]), chain_tree(2)]
    # clock reads per round: plain decoding's verification start and end (it drafts nothing, so its drafting
    # reads the clock once), then the chain's drafting and verification, start and end of each: 7. Plain
    # decoding's verification is held up for 50 s in measured rounds 1 and 2 of 3 (what a median would keep)
    held_up = {1 * 7 + 2, 2 * 7 + 2}
    reads = iter(range(1000))
    clock = [0.0]

    def perf_counter() -> float:
        clock[0] += 50.0 if next(reads) in held_up else 1.0
        return clock[0]

    monkeypatch.setattr(tree_tuning, "time", SimpleNamespace(perf_counter=perf_counter))
    costs = tree_tuning.measure_step_costs(model, trees, prefix_len=16, repeats=3)
    assert costs[trees[0]] == tree_tuning.StepCost(draft=0.0, verify=1.0)
    assert costs[trees[1]] == tree_tuning.StepCost(draft=1.0, verify=1.0)


@pytest.mark.parametrize(
    ("value", "setting"), [("auto", "auto"), ("calibrated", "calibrated"), (12, 12), ("12", 12)]
)
def test_parse_tree_spec_takes_a_node_count_auto_or_calibrated(value, setting):
    assert parse_tree_spec(value) == setting


@pytest.mark.parametrize("value", [0, "0", -1, "-1", True, 1.5, "big", None, ""])
def test_parse_tree_spec_refuses_anything_else(value):
    with pytest.raises(ConfigError, match="tree must be a node count >= 1, 'auto' or 'calibrated'"):
        parse_tree_spec(value)
