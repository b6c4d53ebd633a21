"""Tuned peers: prompt lookup's stats are counted from the decoder forwards, its first-token time is the
prefill's put, the walks the sweep ranks by are exact, and both tuners pick a timed best of the sweep."""

from __future__ import annotations

import time

import pytest

from medusa_lora.decoding import GenerationOutput, GenerationStats, generate
from medusa_lora.errors import ConfigError
from medusa_lora.eval import peers
from medusa_lora.eval.peers import PromptLookupSetting, SuffixSetting
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel

from conftest import tiny_llama
from test_generation import hf_greedy

PROMPTS = [[5, 6, 7, 8] * 5, [40, 2, 2, 9, 13] * 4 + [40, 2]]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.mark.parametrize("setting", [PromptLookupSetting(4, 2), PromptLookupSetting(2, 1)])
def test_prompt_lookup_is_greedy_and_counts_its_forwards(base, setting):
    for prompt in PROMPTS:
        out = peers.prompt_lookup_generate(base, prompt, 24, [], setting)
        assert out.tokens == hf_greedy(base, prompt, 24)
        walk = peers._walk_prompt_lookup(setting, prompt, out.tokens, 24, [])
        assert out.stats.accepted_lengths == walk.accepted[1:]  # hook count == exact walk
        assert walk.accepted[0] + sum(out.stats.accepted_lengths) == out.stats.new_tokens
    assert (
        setting.label
        == f"prompt lookup (transformers), {setting.num_tokens} tokens, n-gram {setting.ngram_size}"
    )


def test_first_token_time_is_the_prefill_forward(base, monkeypatch):
    """transformers puts the prompt, then each forward's tokens: the clock's second put lands after the first
    forward (which can carry several tokens) and before the second."""
    events: list[tuple[str, float, int]] = []
    clock_put = peers._FirstTokenClock.put

    def put(self, value):
        clock_put(self, value)
        events.append(("put", time.perf_counter(), value.numel()))

    setting = PromptLookupSetting(8, 2)
    greedy = hf_greedy(base, PROMPTS[0], 24)
    # a prompt (the model's own text) whose prefill draft is partly right: the first put carries > 1 token
    prompt = next(
        PROMPTS[0] + greedy[:m]
        for m in range(24)
        if peers._walk_prompt_lookup(setting, PROMPTS[0] + greedy[:m], greedy[m:], 24 - m, []).accepted[0] > 1
    )
    monkeypatch.setattr(peers._FirstTokenClock, "put", put)
    handle = base.register_forward_hook(lambda *_: events.append(("forward", time.perf_counter(), 0)))
    try:
        start = time.perf_counter()
        out = peers.prompt_lookup_generate(base, prompt, 8, [], setting)
    finally:
        handle.remove()
    kinds = [kind for kind, _, _ in events]
    assert kinds[:3] == ["put", "forward", "put"] and events[0][2] == len(prompt)
    first_put = events[2]
    assert first_put[2] == out.stats.new_tokens - sum(out.stats.accepted_lengths) > 1  # a drafted prefill
    end = time.perf_counter()
    # the clock starts after `start` and stops at that put: TTFT is within [first put - start] and leaves
    # at least the time from that put to the end for the decode
    assert 0 < out.stats.time_to_first_token_s <= first_put[1] - start
    assert out.stats.wall_time_s - out.stats.time_to_first_token_s <= end - first_put[1]
    assert kinds.count("forward") == len(out.stats.accepted_lengths) + 1


def test_tune_prompt_lookup_times_the_estimated_best(base):
    setting, table = peers.tune_prompt_lookup(base, PROMPTS, 16, [], num_tokens=(2, 6), ngram_sizes=(1, 2))
    assert len(table) == 4 and sum(row["chosen"] for row in table) == 1
    timed = [row for row in table if row["median_tok_s"] is not None]
    assert len(timed) == 3
    chosen = next(row for row in table if row["chosen"])
    assert chosen["setting"] == setting.label
    assert chosen["median_tok_s"] == max(row["median_tok_s"] for row in timed)
    ranked = sorted(table, key=lambda row: -row["estimated_speedup"])
    assert all(row["median_tok_s"] is not None for row in ranked[:3])
    with pytest.raises(ConfigError, match="num_tokens"):
        peers.tune_prompt_lookup(base, PROMPTS, 16, [], num_tokens=())


def test_suffix_walk_is_exact_and_tuning_picks_a_timed_depth(base):
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=2))
    setting = SuffixSetting(4)
    truths = [hf_greedy(base, p, 12) for p in PROMPTS]
    walks = peers._walk_suffix(setting, PROMPTS, truths)
    drafter = setting.drafter()
    for prompt, truth, walk in zip(PROMPTS, truths, walks):
        out = peers.suffix_generate(model, prompt, 12, [], setting, drafter)
        assert out.tokens == truth
        assert out.stats.accepted_lengths == walk.accepted[1:]
    chosen, table = peers.tune_suffix(model, PROMPTS, 12, [], max_depths=(2, 4), finalists=1)
    assert [row["chosen"] for row in table].count(True) == 1
    assert chosen.label in {row["setting"] for row in table if row["chosen"]}


def test_suffix_generate_without_a_drafter_starts_fresh(base):
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=2))
    a = peers.suffix_generate(model, PROMPTS[0], 12, [], SuffixSetting(3))
    b = peers.suffix_generate(model, PROMPTS[0], 12, [], SuffixSetting(3))
    assert a.stats.accepted_lengths == b.stats.accepted_lengths
    assert a.tokens == generate(model, PROMPTS[0], 12, speculative=False, eos_token_id=[]).tokens


def test_interleaved_speeds_time_fresh_runners_in_a_rotating_order_after_one_untimed_run_each():
    """Each setting's first runner only warms up (the first prompt, untimed); fresh ones are timed on every
    prompt, the settings' order rotating from prompt to prompt."""
    runs: list[tuple[str, int, tuple[int, ...]]] = []

    def maker(setting):
        made = []

        def make_runner():
            runner = len(made)
            made.append(runner)

            def run(prompt):
                runs.append((setting, runner, tuple(prompt)))
                return GenerationOutput([0], GenerationStats(new_tokens=4 * len(runs), wall_time_s=1.0))

            return run

        return make_runner

    speeds = peers.interleaved_speeds([maker("x"), maker("y")], [[1], [2], [3]])
    assert runs == [
        ("x", 0, (1,)),
        ("y", 0, (1,)),
        ("x", 1, (1,)),
        ("y", 1, (1,)),
        ("y", 1, (2,)),
        ("x", 1, (2,)),
        ("x", 1, (3,)),
        ("y", 1, (3,)),
    ]
    assert speeds == [[12.0, 24.0, 28.0], [16.0, 20.0, 32.0]]  # the timed runs' tok/s, per setting and prompt
