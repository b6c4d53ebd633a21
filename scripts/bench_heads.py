"""Heads of several adapters side by side: tok/s and tokens per step of each adapter's heads alone (eval's
row c) on the same test prompts, interleaved in one process (a script, not a test).

    python scripts/bench_heads.py runs/v-root/model runs/r1-130/model --test-file data/task/test.jsonl

Every adapter runs with its ``auto`` tree (tuned for this device, per adapter) and with its calibrated trees
of ``--sizes`` nodes, so adapters also compare on trees of equal size, and with plain decoding, the baseline
of its speedups and of its "same" column (outputs identical to its own plain decoding). Each prompt runs every
setting once, in an order that rotates from prompt to prompt, after one untimed prompt per setting. Speedups
are medians of per-prompt tok/s; "ms/step" is decoding time (after the first token) per step.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from medusa_lora.decoding import GenerationOutput, eos_token_ids, generate
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.peers import rotated
from medusa_lora.eval.run import load_models
from medusa_lora.model.inference import freeze_gc
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields
from medusa_lora.trees.choice import choose_tree
from medusa_lora.trees.tree import TokenTree, calibrated_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", type=Path, nargs="+", help="medusa-lora dirs (LoRA + heads)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="*", default=[8, 16], help="calibrated tree sizes")
    args = parser.parse_args()
    models = {str(path): load_models(args.model, path, None, torch.float32)[0] for path in args.adapters}
    freeze_gc()
    first = next(iter(models.values()))
    prompt_format = PromptFormat(first.tokenizer, True)
    examples = load_examples(
        DataSpec(args.test_file, None, None, RecordFields(), "id"), prompt_format, args.num_prompts
    )
    stop = prompt_format.stop_ids(eos_token_ids(first))
    settings: dict[str, tuple] = {}
    for name, model in models.items():
        if not model.config.hit_rates:
            parser.error(f"{name} has no calibrated hit rates")
        settings[f"{name}, plain decoding"] = (model, None)
        auto = choose_tree(model, "auto", min_nodes=2).tree
        settings[f"{name}, auto ({auto.size} nodes)"] = (model, auto)
        for size in args.sizes:
            settings[f"{name}, {size} nodes"] = (model, calibrated_tree(model.config.hit_rates, size))

    def run(setting: tuple, prompt: list[int]) -> GenerationOutput:
        model, tree = setting
        speculative = isinstance(tree, TokenTree)
        return generate(
            model, prompt, args.max_new_tokens, tree=tree, speculative=speculative, eos_token_id=stop
        )

    for setting in settings.values():  # untimed
        run(setting, examples[0].prompt_ids)
    outputs: dict[str, list[GenerationOutput]] = {name: [] for name in settings}
    for n, example in enumerate(examples):
        for name in rotated(list(settings), n):
            outputs[name].append(run(settings[name], example.prompt_ids))
    print(f"{len(examples)} prompts, {args.max_new_tokens} new tokens at most")
    for name, outs in outputs.items():
        plain_outs = outputs[f"{name.rsplit(', ', 1)[0]}, plain decoding"]
        plain = statistics.median(out.stats.tokens_per_s for out in plain_outs)
        same = sum(out.tokens == ref.tokens for out, ref in zip(outs, plain_outs))
        steps = sum(out.stats.steps for out in outs)
        tokens = sum(sum(out.stats.accepted_lengths) for out in outs)
        decode_s = sum(out.stats.wall_time_s - out.stats.time_to_first_token_s for out in outs)
        speed = statistics.median(out.stats.tokens_per_s for out in outs)
        print(
            f"{name:60s} {speed:5.1f} tok/s {speed / plain:5.2f}x  {tokens / steps:5.2f} tok/step  "
            f"{decode_s / steps * 1e3:6.1f} ms/step  same {same}/{len(outs)}"
        )


if __name__ == "__main__":
    main()
