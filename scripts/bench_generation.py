"""Benchmark the speculative machinery with an oracle drafter (a script, not a test).

The oracle proposes the base model's true greedy continuation, so every step accepts the tree's full
depth; what is left to measure is what the machinery costs. For each tree it prints tok/s, the speedup
over plain decoding on the same code path, tokens per step, and the share of wall time spent outside
the model's forward (drafting, masks, verification, cache compaction, bookkeeping).

    python scripts/bench_generation.py --model smollm2-135m --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from medusa_lora.decoding import generate
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.trees.tree import chain_tree, default_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from drafters import OracleDrafter  # a test helper

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short list of tips for writing clean Python code.",
    "Describe how a hash map works.",
]


class ForwardTimer:
    """Adds up the time spent inside the decoder and LM-head forwards (pre/post hooks)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        for module in modules:
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: object) -> None:
        self.total += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    model = MedusaLoraModel.from_base(args.model, dtype=dtype)
    prompt_format = PromptFormat(model.tokenizer)
    prompts = [prompt_format.encode(p) for p in PROMPTS]
    timer = ForwardTimer(model.decoder, model.lm_head)
    n = args.max_new_tokens
    references = [
        generate(model, p, max_new_tokens=n, speculative=False).tokens for p in prompts
    ]  # warm-up too

    def run(tree, speculative: bool) -> tuple[float, float, float]:
        rates, lengths, outside = [], [], []
        for prompt, ref in zip(prompts, references):
            timer.total = 0.0
            drafter = OracleDrafter(ref + [0] * 8, model.config.vocab_size)
            out = generate(
                model, prompt, max_new_tokens=n, tree=tree, speculative=speculative, drafter=drafter
            )
            assert out.tokens == ref[: len(out.tokens)], "oracle output differs from plain decoding"
            rates.append(out.stats.tokens_per_s)
            lengths.append(out.stats.mean_accepted_length)
            outside.append(1 - timer.total / out.stats.wall_time_s)
        return statistics.median(rates), statistics.mean(lengths), statistics.mean(outside)

    base_rate, _, base_outside = run(None, speculative=False)
    print(
        f"model {args.model} {args.dtype}, {torch.get_num_threads()} threads, {n} new tokens, "
        f"{len(prompts)} prompts (median tok/s)"
    )
    print(
        f"{'tree':<22}{'nodes':>6}{'depth':>6}{'tok/s':>8}{'speedup':>9}{'tok/step':>10}{'outside fwd':>13}"
    )
    print(f"{'plain decoding':<22}{1:>6}{0:>6}{base_rate:>8.1f}{1.0:>8.2f}x{1.0:>10.2f}{base_outside:>12.1%}")
    trees = [(f"chain depth {d}", chain_tree(d)) for d in (1, 2, 3, 4)]
    trees += [(f"default {s}", default_tree(s)) for s in (8, 16, 32, 64)]
    for name, tree in trees:
        rate, length, outside = run(tree, speculative=True)
        print(
            f"{name:<22}{tree.size:>6}{tree.depth:>6}{rate:>8.1f}{rate / base_rate:>8.2f}x{length:>10.2f}{outside:>12.1%}"
        )


if __name__ == "__main__":
    main()
