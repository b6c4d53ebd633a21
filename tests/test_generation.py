"""generate(): the core promise (greedy output == transformers greedy output), the oracle, the cache,
lossless sampling, stop conditions and bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from medusa_lora.decoding import generate
from medusa_lora.drafting.hybrid import HybridDrafter
from medusa_lora.drafting.suffix import SuffixDrafter
from medusa_lora.errors import ConfigError, PromptError
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees import choice as tree_choice
from medusa_lora.trees.choice import choose_tree
from medusa_lora.trees.tree import TokenTree, calibrated_tree, chain_tree, default_tree
from medusa_lora.trees.tuning import DEFAULT_SIZES, StepCost
from medusa_lora.trees.walk import expected_accepted_length
from medusa_lora.verification.attention import (
    TREE_ATTENTION,
    medusa_tree_attention,
    tree_attention_kwargs,
    use_tree_attention,
)
from medusa_lora.verification.kv_cache import compact_cache
from medusa_lora.verification.verify import SamplingConfig, target_probs

from conftest import TINY_VOCAB, randomize_heads, tiny_llama, tiny_mistral, tiny_qwen2
from drafters import NoisyOracleDrafter, OracleDrafter
from test_tree import random_trees

pytestmark = pytest.mark.usefixtures("both_forwards")  # every test on the eager and the static forward


def hf_greedy(base, prompt, n):
    ids = torch.tensor([prompt], device=base.device)
    out = base.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def random_prompt(rng, vocab=TINY_VOCAB, low=1, high=40):
    return [rng.randrange(vocab) for _ in range(rng.randint(low, high))]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
def test_greedy_output_equals_transformers_generate(factory):
    rng = random.Random(0)
    base = factory()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    trained = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    randomize_heads(trained, seed=3)
    conditioned = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4, root_conditioned=True))
    randomize_heads(conditioned, seed=4)  # heads that see the root token too
    path = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4, path_conditioned=True))
    randomize_heads(path, seed=5)  # heads that see the root and the earlier heads' drafts
    for i in range(4):
        prompt = random_prompt(rng)
        expected = hf_greedy(base, prompt, 30)
        for m in (model, trained, conditioned, path):
            for tree in (chain_tree(4), default_tree(8), default_tree(16), default_tree(64)):
                assert generate(m, prompt, max_new_tokens=30, tree=tree).tokens == expected, (i, tree)
        assert generate(model, prompt, max_new_tokens=30, speculative=False).tokens == expected
        noisy = NoisyOracleDrafter(expected + [0] * 8, TINY_VOCAB, seed=i)
        out = generate(model, prompt, max_new_tokens=30, tree=default_tree(32), drafter=noisy)
        assert out.tokens == expected
        assert out.stats.mean_accepted_length > 1.5  # the drafts are right most of the time


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("tree_kind", ["chain", "default"])
def test_oracle_accepts_the_full_depth_every_step(depth, tree_kind):
    base = tiny_llama(seed=depth)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    prompt = random_prompt(random.Random(depth))
    steps = 6
    n = 1 + steps * (depth + 1)
    expected = hf_greedy(base, prompt, n)
    tree = chain_tree(depth) if tree_kind == "chain" else default_tree(16 * depth, num_heads=depth)
    assert tree.depth == depth
    out = generate(model, prompt, max_new_tokens=n, tree=tree, drafter=OracleDrafter(expected, TINY_VOCAB))
    assert out.tokens == expected
    assert out.stats.accepted_lengths == [depth + 1] * steps
    assert out.stats.mean_accepted_length == depth + 1
    assert out.stats.accepted_length_histogram == {depth + 1: steps}


@settings(max_examples=25, deadline=None)
@given(tree=random_trees(max_nodes=30, max_depth=4, max_rank=4), data=st.data())
def test_cache_compaction_equals_recomputing_the_cache(tree, data):
    torch.manual_seed(0)
    base = tiny_llama()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    prompt = torch.randint(0, TINY_VOCAB, (1, data.draw(st.integers(1, 20))))
    tokens = torch.randint(0, TINY_VOCAB, (tree.size,))
    leaf = data.draw(st.integers(0, tree.size - 1))
    accepted = sorted({leaf} | {n for n in range(tree.size) if tree.tensors().mask[leaf, n]})
    accepted = torch.tensor(accepted)

    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        model.hidden_states(prompt, cache=cache, use_cache=True)
        positions = prompt.shape[1] + tree.tensors().depths
        kwargs = tree_attention_kwargs(base, tree, prompt.shape[1]) if tree.size > 1 else {}
        model.hidden_states(tokens[None], position_ids=positions[None], cache=cache, use_cache=True, **kwargs)
        compact_cache(cache, prompt.shape[1], accepted)
        fresh = DynamicCache(config=base.config)
        model.hidden_states(torch.cat([prompt[0], tokens[accepted]])[None], cache=fresh, use_cache=True)
    assert cache.get_seq_length() == fresh.get_seq_length() == prompt.shape[1] + len(accepted)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


def test_tree_attention_reads_grouped_kv_heads_in_place_with_the_result_of_repeating_them(monkeypatch):
    """The CPU tree path without the CPU kernels hands SDPA the grouped KV heads as they are (no ``repeat_kv``
    copy of the cache each step); the result is transformers' SDPA on repeated heads, bit for bit."""
    monkeypatch.setenv("MEDUSA_LORA_KERNELS", "reference")
    torch.manual_seed(0)
    base = tiny_llama()
    tree = default_tree(12, num_heads=3)
    prefix = 7
    with pytest.raises(ConfigError, match="use_tree_attention"):  # tree kwargs alone would be ignored by SDPA
        tree_attention_kwargs(base, tree, prefix)
    use_tree_attention(base)
    mask = tree_attention_kwargs(base, tree, prefix)["tree_mask"]
    assert base.config._attn_implementation == TREE_ATTENTION
    layer = base.model.layers[0].self_attn
    heads, kv_heads = base.config.num_attention_heads, base.config.num_key_value_heads
    assert heads > kv_heads
    query = torch.randn(1, heads, tree.size, 8)
    key, value = torch.randn(2, 1, kv_heads, prefix + tree.size, 8)
    ours, _ = medusa_tree_attention(layer, query, key, value, None, scaling=0.3, tree_mask=mask)
    expected, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.3)
    assert torch.equal(ours, expected)
    plain, _ = medusa_tree_attention(layer, query[:, :, :1], key, value, None, scaling=0.3)  # no tree: SDPA
    torch.testing.assert_close(
        plain, sdpa_attention_forward(layer, query[:, :, :1], key, value, None, scaling=0.3)[0]
    )


def chi_square_p_value(observed: list[int], expected: list[float]) -> float:
    """Pearson's chi-square p-value (Wilson-Hilferty approximation), merging cells with expectation < 5."""
    cells, obs_acc, exp_acc = [], 0, 0.0
    for o, e in sorted(zip(observed, expected), key=lambda x: x[1]):
        obs_acc, exp_acc = obs_acc + o, exp_acc + e
        if exp_acc >= 5:
            cells.append((obs_acc, exp_acc))
            obs_acc, exp_acc = 0, 0.0
    if exp_acc and cells:
        o, e = cells.pop()
        cells.append((o + obs_acc, e + exp_acc))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    k = len(cells) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


SAMPLING_VOCAB = 8
SAMPLING_PROMPT = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # the likely tokens, for a copy drafter to copy
SAMPLED = 4  # tokens per sample: token 0 (prefill), then one step that can accept up to depth 3


def peaked_model(num_heads: int) -> MedusaLoraModel:
    """A tiny model whose next-token distribution is peaked on the same few tokens everywhere (an LM-head
    bias) yet depends on the context (the random LM-head weights): identity-initialised heads then
    propose the likely tokens, and drafts are accepted at depth 2 and 3 often."""
    base = tiny_llama(seed=11, vocab_size=SAMPLING_VOCAB, layers=1)
    head = torch.nn.Linear(base.config.hidden_size, SAMPLING_VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(base.lm_head.weight * 25)  # the context moves the logits by ~1
        head.bias.copy_(torch.tensor([3.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.0, -1.0]))
    base.lm_head = head
    return MedusaLoraModel.from_base(base, MedusaConfig(num_heads=num_heads))


def exact_joint(model: MedusaLoraModel, sampling: SamplingConfig) -> torch.Tensor:
    """P(tokens 0..SAMPLED-1) under plain sampling, flattened: one forward over every continuation."""
    continuations = torch.cartesian_prod(*[torch.arange(SAMPLING_VOCAB)] * (SAMPLED - 1))
    prompts = torch.tensor(SAMPLING_PROMPT).expand(len(continuations), -1)
    with torch.no_grad():
        logits = model.causal_lm(torch.cat([prompts, continuations], 1)).logits
    probs = target_probs(logits[:, len(SAMPLING_PROMPT) - 1 :], sampling)  # (N, SAMPLED, V)
    joint = probs[0, 0]
    for i in range(1, SAMPLED):
        index = continuations[:, :i] @ (SAMPLING_VOCAB ** torch.arange(i - 1, -1, -1))
        step = torch.zeros([SAMPLING_VOCAB] * i + [SAMPLING_VOCAB])
        step.view(-1, SAMPLING_VOCAB)[index] = probs[:, i]
        joint = joint[..., None] * step
    return joint.flatten()


def head_drafts(model):
    """The Medusa heads (the default drafter), on a tree that is 3 deep and 2 wide near the root."""
    return None, TokenTree([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])


def copy_drafts(model):
    """A copy drafter: suffix matching over the prompt and the output so far (a chain; after some roots
    it proposes fewer tokens, or none)."""
    return SuffixDrafter(max_tree_depth=8, min_token_prob=0.0), chain_tree(3)


def hybrid_drafts(model):
    """A hybrid tree: the heads' 2-deep tree plus the suffix drafter's path, along the heads' nodes while
    they agree and as a chain below them (up to depth 3)."""
    copy = SuffixDrafter(max_tree_depth=8, min_token_prob=0.0)
    return HybridDrafter(model.heads, copy, max_copy_tokens=3, min_agreement=0), TokenTree(
        [(0,), (1,), (0, 0)]
    )


@pytest.mark.parametrize(
    "drafts,temperature,top_p",
    [(head_drafts, 1.0, 1.0), (copy_drafts, 0.7, 0.9), (hybrid_drafts, 0.8, 1.0)],
    ids=["heads", "copy-top-p", "hybrid"],
)
def test_speculative_sampling_matches_plain_sampling(drafts, temperature, top_p):
    """The joint distribution of tokens 0..3, where tokens 1..3 come from one step's accepted drafts (depth
    1, 2 or 3) and the token sampled after the last accepted one, equals plain sampling's, exactly."""
    model = peaked_model(num_heads=3)
    joint = exact_joint(model, SamplingConfig(temperature=temperature, top_p=top_p))
    n = 1200
    counts = [0] * SAMPLING_VOCAB**SAMPLED
    deep = 0
    for seed in range(n):
        drafter, tree = drafts(model)  # a fresh drafter: every sample is independent
        out = generate(
            model,
            SAMPLING_PROMPT,
            max_new_tokens=SAMPLED,
            temperature=temperature,
            top_p=top_p,
            tree=tree,
            seed=seed,
            drafter=drafter,
        )
        counts[sum(t * SAMPLING_VOCAB**i for i, t in enumerate(reversed(out.tokens)))] += 1
        deep += out.stats.accepted_lengths[0] == SAMPLED - 1  # step 1 accepted drafts at depth >= 2
    assert deep > n // 4  # acceptances at depth 2 and 3 really happen
    assert chi_square_p_value(counts, (joint * n).tolist()) > 1e-3


def test_typical_acceptance_is_opt_in_and_samples():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2))
    out = generate(model, [1, 2, 3], max_new_tokens=12, temperature=0.8, typical_epsilon=0.09, seed=0, tree=8)
    assert len(out.tokens) == 12 and all(0 <= t < TINY_VOCAB for t in out.tokens)
    with pytest.raises(ConfigError, match="temperature > 0"):
        generate(model, [1, 2, 3], typical_epsilon=0.09)


class CharTokenizer:
    """Token i decodes to one letter: enough for stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture
def oracle_setup():
    base = tiny_llama(seed=4)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    prompt = [3, 1, 4, 1, 5]
    expected = hf_greedy(base, prompt, 40)
    return model, prompt, expected


def test_stops_at_eos_inside_an_accepted_span(oracle_setup):
    model, prompt, expected = oracle_setup
    cut = next(i for i in range(6, 40) if expected[i] not in expected[:i])
    out = generate(
        model,
        prompt,
        max_new_tokens=40,
        tree=chain_tree(4),
        eos_token_id=expected[cut],
        drafter=OracleDrafter(expected, TINY_VOCAB),
    )
    assert out.tokens == expected[: cut + 1]


@pytest.mark.parametrize("n", [1, 2, 7, 13])
def test_stops_exactly_at_max_new_tokens(oracle_setup, n):
    model, prompt, expected = oracle_setup
    out = generate(
        model, prompt, max_new_tokens=n, tree=chain_tree(4), drafter=OracleDrafter(expected, TINY_VOCAB)
    )
    assert out.tokens == expected[:n] and out.stats.new_tokens == n


def test_stops_at_a_stop_string(oracle_setup):
    model, prompt, expected = oracle_setup
    text = CharTokenizer().decode(expected)
    stop = text[9:11]
    end = text.index(stop) + len(stop)
    out = generate(
        model,
        prompt,
        max_new_tokens=40,
        tree=chain_tree(4),
        stop_strings=[stop],
        tokenizer=CharTokenizer(),
        drafter=OracleDrafter(expected, TINY_VOCAB),
    )
    assert out.tokens == expected[:end]
    assert out.text == text[:end]


def test_streamer_gets_the_prompt_then_every_token():
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=3))
    streamer = Collect()
    out = generate(model, [5, 6, 7], max_new_tokens=20, streamer=streamer)
    assert streamer.chunks[0] == [5, 6, 7] and streamer.ended
    assert [t for chunk in streamer.chunks[1:] for t in chunk] == out.tokens


def test_long_prompts_up_to_the_context():
    base = tiny_llama(seed=2)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    prompt = random_prompt(random.Random(1), low=480, high=480)
    assert generate(model, prompt, max_new_tokens=20, tree=16).tokens == hf_greedy(base, prompt, 20)
    out = generate(model, random_prompt(random.Random(2), low=505, high=505), max_new_tokens=50, tree=16)
    assert 1 <= len(out.tokens) <= 512 - 505 + 1  # never feeds a position past the context


def test_stats_are_consistent():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4))
    out = generate(model, [1, 2, 3, 4], max_new_tokens=25)
    s = out.stats
    assert s.new_tokens == len(out.tokens) == 1 + sum(s.accepted_lengths)
    assert s.steps == len(s.accepted_lengths) and s.prompt_tokens == 4
    assert 0 < s.time_to_first_token_s <= s.wall_time_s and s.tokens_per_s > 0
    assert 0 < s.draft_time_s < s.wall_time_s - s.time_to_first_token_s
    assert generate(model, [1, 2, 3, 4], max_new_tokens=5, speculative=False).stats.draft_time_s == 0
    assert sum(k * v for k, v in s.accepted_length_histogram.items()) == sum(s.accepted_lengths)
    assert s.to_dict()["mean_accepted_length"] == s.mean_accepted_length


def test_bad_input_is_refused():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2))
    with pytest.raises(PromptError, match="empty"):
        generate(model, [])
    with pytest.raises(PromptError, match="context is 512"):
        generate(model, [1] * 600)
    with pytest.raises(ConfigError, match="only 2 Medusa heads"):
        generate(model, [1, 2], tree=chain_tree(3))
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, [1, 2], temperature=-0.1)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, [1, 2], temperature=1.0, top_p=0.0)
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, "text without a tokenizer")


def test_sliding_window_models_stay_inside_the_window():
    model = MedusaLoraModel.from_base(tiny_mistral(sliding_window=48), MedusaConfig(num_heads=4))
    out = generate(model, list(range(40)), max_new_tokens=30, tree=16)
    assert len(out.tokens) <= 47 - 40 + 1  # the cache keeps window - 1 rows


def test_tree_depth_is_bounded_by_the_heads():
    base = tiny_llama(seed=13)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    prompt = [1, 2, 3]
    with pytest.raises(ConfigError, match="4 deep but the model has only 3 Medusa heads"):
        generate(model, prompt, tree=chain_tree(4))
    expected = hf_greedy(base, prompt, 21)
    heads = generate(model, prompt, max_new_tokens=21, tree=chain_tree(3))  # as deep as the heads: allowed
    assert heads.tokens == expected and max(heads.stats.accepted_lengths) <= 4
    oracle = generate(
        model, prompt, max_new_tokens=21, tree=chain_tree(3), drafter=OracleDrafter(expected, TINY_VOCAB)
    )
    assert oracle.tokens == expected and oracle.stats.accepted_lengths == [4] * 5  # 3 drafts + 1 own token


def test_draft_vocabulary_keeps_greedy_output_identical():
    base = tiny_llama(seed=9)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    prompt = random_prompt(random.Random(9))
    expected = hf_greedy(base, prompt, 30)
    model.set_draft_vocab(torch.tensor(sorted(set(expected))[:12]))
    out = generate(model, prompt, max_new_tokens=30, tree=default_tree(16, 3))
    assert out.tokens == expected
    with pytest.raises(ConfigError, match="heads score 12 tokens"):
        generate(model, prompt, tree=TokenTree([(i,) for i in range(13)]))


def test_auto_tree_weighs_every_size_up_to_12_so_a_chain_as_deep_as_the_heads_can_win(monkeypatch):
    base = tiny_llama(seed=14)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=8))
    model.config.hit_rates = [[0.95, 0.01]] * 8  # the best 9-node tree is the chain of all 8 heads
    cost = {
        size: 1.0 + 0.01 * size if size <= 9 else 2.0 for size in range(1, 33)
    }  # 10+ nodes: twice as dear
    monkeypatch.setattr(
        tree_choice,
        "measure_step_costs",
        lambda model, trees: {tree: StepCost(0.0, cost[tree.size]) for tree in trees},
    )
    choice = choose_tree(model, "auto")
    assert choice.tree == chain_tree(8) == calibrated_tree(model.config.hit_rates, 9)


def test_auto_tree_is_tuned_once_and_keeps_output_identical(monkeypatch):
    base = tiny_llama(seed=12)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    assert choose_tree(model, "auto").source == "default"  # no hit rates: nothing to tune from
    rates = [[0.9, 0.05], [0.8, 0.05], [0.7, 0.05]]
    model.config.hit_rates = rates
    measured = []
    measure = tree_choice.measure_step_costs
    monkeypatch.setattr(
        tree_choice, "measure_step_costs", lambda *a: measured.append(measure(*a)) or measured[-1]
    )
    prompt = random_prompt(random.Random(12))
    out = generate(model, prompt, max_new_tokens=20, tree="auto")
    assert out.tokens == hf_greedy(base, prompt, 20)
    generate(model, prompt, max_new_tokens=5, tree="auto")
    choice = choose_tree(model, "auto")
    assert len(measured) == 1  # measured once per model
    assert choice.source == "tuned"
    assert choice.tree in {TokenTree([])} | {calibrated_tree(rates, size) for size in DEFAULT_SIZES}
    assert choice.predicted_tokens_per_step == expected_accepted_length(choice.tree, rates)
    costs = measured[0]
    assert tree_choice.relative_step_cost(model, choice.tree) == (
        costs[choice.tree].total / costs[TokenTree([])].total
    )
    assert tree_choice.relative_step_cost(model, TokenTree([(5,)])) is None  # never measured
    with pytest.raises(ConfigError, match="'auto'"):
        generate(model, prompt, tree="big")
