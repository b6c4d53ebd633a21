"""Suffix decoding: the trie finds the right continuation, drafts only on a match, and generate() with it
stays identical to plain greedy decoding while accepting several tokens per step on repetitive text."""

from __future__ import annotations

import random

import pytest

from medusa_lora.decoding import generate
from medusa_lora.drafting.drafter import Drafter
from medusa_lora.drafting.suffix import SuffixDrafter, SuffixTrie
from medusa_lora.errors import ConfigError
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import TokenTree, chain_tree, default_tree

from conftest import tiny_llama, tiny_mistral, tiny_qwen2
from test_generation import hf_greedy, random_prompt

pytestmark = pytest.mark.usefixtures("both_forwards")  # every test on the eager and the static forward


def medusa(base) -> MedusaLoraModel:
    return MedusaLoraModel.from_base(base, MedusaConfig(num_heads=2))


def test_trie_proposes_the_most_frequent_continuation_of_the_best_match():
    trie = SuffixTrie(8)
    trie.add([1, 2, 3, 1, 2, 4, 1, 2, 3])
    # "1 2" is followed by 3 twice and 4 once; then "1 2 3" by 1 once (its last occurrence ends the sequence)
    assert trie.speculate([5, 1, 2], 4, 1.0, 0.0) == ([3, 1], pytest.approx(2 / 3 + 1 / 3))
    assert trie.speculate([5, 1, 2], 4, 1.0, 0.5)[0] == [3]  # 1/3 is below min_token_prob
    assert trie.speculate([5, 1, 2], 4, 0.5, 0.0)[0] == [3]  # adaptive: at most 0.5 x match length 2
    assert trie.speculate([5, 1, 2], 1, 1.0, 0.0)[0] == [3]  # at most the depth asked
    assert trie.speculate([7, 9], 4, 1.0, 0.0) == ([], 0.0)  # no match: no draft


def test_trie_depth_limits_pattern_plus_continuation():
    trie = SuffixTrie(3)
    trie.add([1, 2, 3, 4, 5])
    assert trie.speculate([1], 4, 4.0, 0.0)[0] == [2, 3]  # "1 2 3" is the deepest substring kept
    assert trie.speculate([2, 3], 4, 4.0, 0.0)[0] == [4, 5]  # via the shorter match "3": a longer draft


def test_drafter_reads_the_prompt_and_generated_tokens_and_its_cache():
    drafter = SuffixDrafter(max_tree_depth=8)
    assert isinstance(drafter, Drafter) and not drafter.uses_heads
    drafter.begin([10, 11, 12, 13, 20, 21])
    candidates, tree = drafter.draft(None, [30], chain_tree(4))
    assert candidates.shape == (0, 1) and tree.size == 1  # nothing after 30 anywhere: the root alone
    candidates, tree = drafter.draft(None, [30, 10], chain_tree(4))
    assert candidates[:, 0].tolist() == [11] and tree == chain_tree(1)  # match length 1 -> at most 1 token
    assert drafter.propose([30, 10, 11], 4) == [12, 13]
    drafter.end([30, 10, 11, 12, 40])
    drafter.begin([50, 30, 10, 11, 12])  # the cached output continues "30 10 11 12" with 40
    assert drafter.propose([], 4) == [40]
    fresh = SuffixDrafter(max_tree_depth=8)  # without the earlier output
    fresh.begin([50, 30, 10, 11, 12])
    assert fresh.propose([], 4) == []
    with pytest.raises(ConfigError, match="chain tree"):
        drafter.draft(None, [1], default_tree(4, 2))


def test_token_tree_up_to_depth():
    tree = default_tree(16, 4)
    cut = tree.up_to_depth(2)
    assert cut.depth == 2 and set(cut.paths) == {p for p in tree.paths if len(p) <= 2}
    assert tree.up_to_depth(2) is cut and tree.up_to_depth(9) is tree
    assert tree.up_to_depth(0) == TokenTree([])


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
def test_greedy_output_with_suffix_drafter_equals_transformers(factory):
    rng = random.Random(1)
    base = factory()
    model = medusa(base)
    drafter = SuffixDrafter()
    for _ in range(2):
        prompt = random_prompt(rng)
        expected = hf_greedy(base, prompt, 24)
        out = generate(model, prompt, max_new_tokens=24, tree=chain_tree(6), drafter=drafter, eos_token_id=[])
        assert out.tokens == expected


def test_repetitive_prompts_accept_drafts_and_stay_identical():
    base = tiny_llama()
    model = medusa(base)
    steps = []
    for pattern in ([5, 6, 7, 8], [40, 2, 2, 9, 13], [70, 71]):
        prompt = pattern * 6
        expected = hf_greedy(base, prompt, 32)
        out = generate(model, prompt, 32, tree=chain_tree(8), drafter=SuffixDrafter(), eos_token_id=[])
        assert out.tokens == expected
        steps += out.stats.accepted_lengths
    assert max(steps) > 2 and len(steps) < 3 * 31


def test_suffix_chains_deeper_than_calibrated_heads():
    """A trained model carries per-head hit rates; a suffix chain deeper than its heads must still run (the
    heads' tokens-per-step prediction does not apply to it)."""
    base = tiny_llama()
    model = medusa(base)
    model.config.hit_rates = [[0.5, 0.1], [0.3, 0.1]]
    prompt = [5, 6, 7, 8] * 6
    out = generate(model, prompt, 24, tree=chain_tree(12), drafter=SuffixDrafter(), eos_token_id=[])
    assert out.tokens == hf_greedy(base, prompt, 24)


def test_no_match_step_costs_a_root_only_forward():
    model = medusa(tiny_llama())
    widths: list[int] = []
    handle = model.decoder.embed_tokens.register_forward_pre_hook(  # every forward embeds its tokens
        lambda _m, args: widths.append(args[0].shape[1])
    )
    rows: list[int] = []

    class Recording(SuffixDrafter):
        def draft(self, head_logits, generated, tree):
            candidates, tree = super().draft(head_logits, generated, tree)
            rows.append(candidates.shape[0])
            return candidates, tree

    prompt = list(range(20, 40))  # no repeats: early steps find nothing to match
    try:
        out = generate(model, prompt, 24, tree=chain_tree(5), drafter=Recording(), eos_token_id=[])
    finally:
        handle.remove()
    assert widths[0] == len(prompt)
    assert widths[1:] == [r + 1 for r in rows]
    assert 0 in rows and len(rows) == out.stats.steps


def test_cache_of_earlier_outputs_speeds_up_a_repeated_prompt():
    base = tiny_llama()
    model = medusa(base)
    rng = random.Random(5)
    prompt = random_prompt(rng, low=20, high=20)
    drafter = SuffixDrafter()
    first = generate(model, prompt, 30, tree=chain_tree(8), drafter=drafter, eos_token_id=[])
    second = generate(model, prompt, 30, tree=chain_tree(8), drafter=drafter, eos_token_id=[])
    assert second.tokens == first.tokens == hf_greedy(base, prompt, 30)
    assert second.stats.steps < first.stats.steps / 2


def test_bad_settings_are_config_errors():
    for kwargs in ({"max_tree_depth": 1}, {"max_spec_factor": 0}, {"min_token_prob": 1.5}):
        with pytest.raises(ConfigError):
            SuffixDrafter(**kwargs)
