"""Hybrid trees vs the heads' tree alone: tok/s and tokens per step of ``HybridDrafter`` settings on a task's
test prompts (a script, not a test).

    python scripts/bench_hybrid.py --adapter runs/task-medusa-lora/model --test-file data/task/test.jsonl

The heads' tree is the one ``--tree`` (default ``auto``) picks for the adapter; each hybrid setting adds
suffix decoding's path (``--copy-tokens``) when it agrees with at least ``--agreement`` of the heads' first
tokens.
Settings run prompt by prompt in turn (each with its own suffix drafter, which also drafts from its earlier
outputs); the heads alone run first and last, so drift shows. Every output is checked against plain decoding.
"tok/s (all)": all the prompts' tokens over all their time (long answers count at their length; the median
counts each prompt once). "draft ms/step": host time in the drafter and the step's tree
(``GenerationStats.draft_time_s``) per step.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from medusa_lora.cli.options import add_tree_option
from medusa_lora.decoding import eos_token_ids, generate
from medusa_lora.drafting.heads import HeadDrafter
from medusa_lora.drafting.hybrid import HybridDrafter
from medusa_lora.drafting.suffix import SuffixDrafter
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.run import load_models
from medusa_lora.model.inference import freeze_gc
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields
from medusa_lora.trees.choice import choose_tree, relative_step_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--agreement", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--copy-tokens", type=int, nargs="+", default=[6, 10])
    add_tree_option(parser, "auto")
    parser.add_argument(
        "--gated",
        action="store_true",
        help="also each setting with the heads' step cost, as the eval's row f runs it (PayGates on)",
    )
    args = parser.parse_args()
    task, _ = load_models(args.model, args.adapter, None, torch.float32)
    freeze_gc()
    prompt_format = PromptFormat(task.tokenizer, True)
    examples = load_examples(
        DataSpec(args.test_file, None, None, RecordFields(), "id"), prompt_format, args.num_prompts
    )
    stop = prompt_format.stop_ids(eos_token_ids(task))
    choice = choose_tree(task, args.tree, min_nodes=2)
    print(f"heads' tree: {choice.label}; {len(examples)} prompts, {args.max_new_tokens} new tokens at most")
    settings = {"heads alone": lambda: HeadDrafter(task.heads)}
    costs = {"": None}
    if args.gated:
        costs[", gated"] = relative_step_cost(task, choice.tree)
    for agreement in args.agreement:
        for copy in args.copy_tokens:
            for label, cost in costs.items():
                settings[f"hybrid, agreement >= {agreement}, copy <= {copy}{label}"] = (
                    lambda a=agreement, c=copy, cost=cost: HybridDrafter(
                        task.heads, SuffixDrafter(), c, a, heads_step_cost=cost
                    )
                )
    settings["heads alone (again)"] = settings["heads alone"]
    drafters = {name: make() for name, make in settings.items()}
    speeds: dict[str, list[float]] = {name: [] for name in settings}
    steps: dict[str, list[int]] = {name: [] for name in settings}
    draft_s: dict[str, float] = dict.fromkeys(settings, 0.0)
    tokens: dict[str, int] = dict.fromkeys(settings, 0)
    wall_s: dict[str, float] = dict.fromkeys(settings, 0.0)
    for example in examples:
        plain = generate(task, example.prompt_ids, args.max_new_tokens, speculative=False, eos_token_id=stop)
        generate(task, example.prompt_ids, args.max_new_tokens, tree=choice.tree, eos_token_id=stop)  # warm
        for name, drafter in drafters.items():
            out = generate(
                task,
                example.prompt_ids,
                args.max_new_tokens,
                tree=choice.tree,
                drafter=drafter,
                eos_token_id=stop,
            )
            if out.tokens != plain.tokens:
                raise SystemExit(f"error: {name} changed the greedy output of {example.id}")
            speeds[name].append(out.stats.tokens_per_s)
            steps[name].extend(out.stats.accepted_lengths)
            draft_s[name] += out.stats.draft_time_s
            tokens[name] += out.stats.new_tokens
            wall_s[name] += out.stats.wall_time_s
    print(f"{'setting':<40} {'tok/s (median)':>14} {'tok/s (all)':>11} {'tok/step':>8} {'draft ms/step':>13}")
    for name in settings:
        speed, per_step = statistics.median(speeds[name]), statistics.mean(steps[name])
        overall = tokens[name] / wall_s[name]
        print(
            f"{name:<40} {speed:>14.1f} {overall:>11.1f} {per_step:>8.2f}"
            f" {1e3 * draft_s[name] / len(steps[name]):>13.3f}"
        )


if __name__ == "__main__":
    main()
