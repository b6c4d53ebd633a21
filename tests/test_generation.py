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

from medusa_lora.attention import tree_attention_kwargs
from medusa_lora.config import MedusaConfig
from medusa_lora.drafting import OracleDrafter
from medusa_lora.errors import ConfigError, PromptError
from medusa_lora.generation import generate
from medusa_lora.kv_cache import compact_cache
from medusa_lora.model import MedusaLoraModel
from medusa_lora.tree import TokenTree, chain_tree, default_tree
from medusa_lora.verify import SamplingConfig, target_probs

from conftest import TINY_VOCAB, tiny_llama, tiny_mistral, tiny_qwen2
from test_tree import random_trees


class NoisyOracleDrafter:
    """Right most of the time: the true token at a random top-k rank with probability `hit`, else absent."""

    uses_heads = False

    def __init__(self, continuation, vocab_size, hit=0.8, seed=0):
        self.continuation, self.vocab_size, self.hit = list(continuation), vocab_size, hit
        self.rng = random.Random(seed)

    def __call__(self, head_logits, generated, depth, k):
        out = torch.randint(
            0, self.vocab_size, (depth, k), generator=torch.Generator().manual_seed(self.rng.randrange(2**31))
        )
        for d in range(depth):
            pos = len(generated) + d
            true = self.continuation[pos] if pos < len(self.continuation) else 0
            out[d][out[d] == true] = (true + 1) % self.vocab_size
            if self.rng.random() < self.hit:
                out[d, self.rng.randrange(k)] = true
        return out


def hf_greedy(base, prompt, n):
    ids = torch.tensor([prompt])
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
    torch.manual_seed(3)
    trained = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    with torch.no_grad():
        for p in trained.heads.parameters():
            p.normal_(0, 0.3)
    for i in range(4):
        prompt = random_prompt(rng)
        expected = hf_greedy(base, prompt, 30)
        for m in (model, trained):
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


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_matches_plain_sampling(temperature, top_p):
    vocab = 8
    base = tiny_llama(seed=11, vocab_size=vocab)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=2))
    prompt = [1, 5, 2]
    sampling = SamplingConfig(temperature=temperature, top_p=top_p)
    with torch.no_grad():
        first = target_probs(base(torch.tensor([prompt])).logits[0, -1], sampling)
        second = target_probs(
            base(torch.tensor([[*prompt, t] for t in range(vocab)])).logits[:, -1], sampling
        )
    joint = (first[:, None] * second).flatten()
    n = 1000
    counts = [0] * vocab * vocab
    accepted_drafts = 0
    for seed in range(n):
        out = generate(
            model,
            prompt,
            max_new_tokens=3,
            temperature=temperature,
            top_p=top_p,
            tree=TokenTree([(0,), (1,), (2,), (0, 0)]),
            seed=seed,
        )
        counts[out.tokens[0] * vocab + out.tokens[1]] += 1
        accepted_drafts += out.stats.accepted_lengths[0] > 1  # step 1 also emitted a drafted token
    assert accepted_drafts > n // 10  # the drafts were really used
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


def test_draft_vocabulary_keeps_greedy_output_identical():
    base = tiny_llama(seed=9)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    prompt = random_prompt(random.Random(9))
    expected = hf_greedy(base, prompt, 30)
    model.heads.set_draft_vocab(torch.tensor(sorted(set(expected))[:12]))
    out = generate(model, prompt, max_new_tokens=30, tree=default_tree(16, 3))
    assert out.tokens == expected
    with pytest.raises(ConfigError, match="heads score 12 tokens"):
        generate(model, prompt, tree=TokenTree([(i,) for i in range(13)]))


def test_auto_tree_is_tuned_once_and_keeps_output_identical():
    base = tiny_llama(seed=12)
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=3))
    with pytest.raises(ValueError, match="hit rates"):
        generate(model, [1, 2, 3], tree="auto")
    model.config.hit_rates = [[0.9, 0.05], [0.8, 0.05], [0.7, 0.05]]
    prompt = random_prompt(random.Random(12))
    out = generate(model, prompt, max_new_tokens=20, tree="auto")
    tuned = model.tuned_tree
    assert tuned is not None and tuned.depth <= 3
    assert out.tokens == hf_greedy(base, prompt, 20)
    generate(model, prompt, max_new_tokens=5, tree="auto")
    assert model.tuned_tree is tuned  # measured once
    with pytest.raises(ConfigError, match="'auto'"):
        generate(model, prompt, tree="big")
