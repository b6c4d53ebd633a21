"""Where a generation's time goes: prefill, and per decoding step the decoder forward, the LM head, the heads'
drafting and the rest (drafter, tree, verification, cache), for plain decoding and for the heads with their
``auto`` tree, or a calibrated tree of ``--tree`` nodes (a script, not a test). On a CPU it also times each of the
CPU extension's kernels (int4 / int8 matmuls, LoRA updates, tree attention, rotary) per step, and in the lean
forward its layers' norms and any linear layers they call back into Python for (the extension's ``step_times``).

    python scripts/bench_step.py runs/task-medusa-lora/model --test-file data/task/test.jsonl [--weights int4]

Both settings run every prompt, alternating, after one untimed prompt each. The parts are timed by wrapping the
model's methods (``hidden_states``, the LM head, ``draft_logits``) with a clock. The last lines say what the
end-to-end speedup is made of: the same prefill in both settings, and decoding sped up by the heads; and what
decoding speedup a given end-to-end speedup would need with that prefill (``--target``).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from medusa_lora.cli.options import add_weights_option
from medusa_lora.decoding import GenerationOutput, eos_token_ids, generate
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.run import load_models
from medusa_lora.kernels._cpu import extension
from medusa_lora.model.inference import freeze_gc
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields
from medusa_lora.trees.choice import choose_tree
from medusa_lora.trees.tree import calibrated_tree
from medusa_lora.verification.forward import forward_name

KERNELS = ("int4_matmul", "int8_matmul", "lora_add_", "tree_attention", "rotary_", "compact_kv")


class Clock:
    """Seconds per part of a generation. The decoder forward opens a phase: the prompt's (called without
    ``position_ids``) is "prefill", a step's is "step"; the LM head and the heads' drafting count in the phase
    they run in."""

    def __init__(self) -> None:
        self.phase = "prefill"
        self.in_prompt = False
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    def forward(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.phase = "step" if "position_ids" in kwargs else "prefill"
            self.in_prompt = self.phase == "prefill"
            try:
                return self.part(fn, "forward")(*args, **kwargs)
            finally:
                self.in_prompt = False

        return timed

    def kernel(self, fn: Callable, name: str) -> Callable:
        """A CPU kernel: counted in the steps unless inside the prompt's forward (the lean forward's steps do not
        call ``hidden_states``; the prompt's LM head, one call, counts in the steps)."""

        def timed(*args):
            start = time.perf_counter()
            result = fn(*args)
            self.seconds["prefill" if self.in_prompt else "step", name] += time.perf_counter() - start
            return result

        return timed

    def part(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.seconds[self.phase, name] += time.perf_counter() - start
            return result

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="a medusa-lora dir (LoRA + heads)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--tree", type=int, default=None, help="a calibrated tree of this many nodes, not auto"
    )
    parser.add_argument(
        "--target", type=float, default=2.5, help="an end-to-end speedup to size decoding for"
    )
    parser.add_argument(
        "--draft-in-fp32",
        action="store_true",
        help="heads draft in the model's fp32, not for_inference's fp16",
    )
    add_weights_option(parser)
    args = parser.parse_args()
    draft_dtype = None if args.draft_in_fp32 else torch.float16
    model = load_models(
        args.model, args.adapter, None, torch.float32, draft_dtype=draft_dtype, weights=args.weights
    )[0]
    freeze_gc()
    prompt_format = PromptFormat(model.tokenizer, True)
    examples = load_examples(
        DataSpec(args.test_file, None, None, RecordFields(), "id"), prompt_format, args.num_prompts
    )
    stop = prompt_format.stop_ids(eos_token_ids(model))
    if args.tree:
        tree, label = calibrated_tree(model.config.hit_rates, args.tree), "calibrated"
    else:
        tree, label = choose_tree(model, "auto", min_nodes=2).tree, "auto"

    clock = Clock()
    model.hidden_states = clock.forward(model.hidden_states)
    model.lm_head.forward = clock.part(model.lm_head.forward, "LM head")
    model.draft_logits = clock.part(model.draft_logits, "drafting (heads)")
    module = extension() if model.device.type == "cpu" else None
    kernels = [name for name in KERNELS if module is not None and hasattr(module, name)]
    for name in kernels:  # looked up at call time by their callers: wrapped in place
        setattr(module, name, clock.kernel(getattr(module, name), name))
    native = module is not None and hasattr(module, "step_times")  # the lean forward's layers time themselves
    if native:
        module.set_step_timing(True)

    def run(speculative: bool, prompt: list[int]) -> GenerationOutput:
        return generate(
            model, prompt, args.max_new_tokens, tree=tree, speculative=speculative, eos_token_id=stop
        )

    settings = {"plain decoding": False, f"heads, {label} tree ({tree.size} nodes)": True}
    totals: dict[str, dict[str, float]] = {}
    for name, speculative in settings.items():
        run(speculative, examples[0].prompt_ids)  # untimed
        totals[name] = defaultdict(float)
    if native:
        module.step_times()  # the untimed runs'
    for example in examples:
        for name, speculative in settings.items():
            clock.seconds.clear()
            out = run(speculative, example.prompt_ids)
            total = totals[name]
            total["wall"] += out.stats.wall_time_s
            total["prefill"] += out.stats.time_to_first_token_s  # the prompt's forward, LM head and drafting
            total["tokens"] += out.stats.new_tokens
            total["steps"] += out.stats.steps
            total["step tokens"] += sum(out.stats.accepted_lengths)
            for (phase, part), seconds in clock.seconds.items():
                if phase == "step":
                    total[part] += seconds
            for part, seconds in module.step_times().items() if native else ():
                part = "forward" if part == "decoder layers" else part  # the lean step's decoder
                total[part] += seconds
                if part not in kernels and part != "forward":
                    kernels.append(part)

    print(f"{len(examples)} prompts, {args.max_new_tokens} new tokens at most; ms per decoding step:")
    weights = args.weights or "the model's own"
    print(f"forward: {forward_name(model)}, weights: {weights}")
    parts = ["forward", "LM head", "drafting (heads)"]
    print(
        f"{'setting':32s} {'tok/s':>6s} {'tok/step':>8s} {'prefill s':>9s} {'decode s':>8s} "
        + " ".join(f"{p:>16s}" for p in parts)
        + f" {'rest':>6s} {'step':>6s}"
    )
    for name, t in totals.items() if kernels else ():
        print(
            f"  {name}, the CPU kernels: " + ", ".join(f"{k} {t[k] * 1e3 / t['steps']:.2f}" for k in kernels)
        )
    for name, t in totals.items():
        decode = t["wall"] - t["prefill"]
        per_step = {p: t[p] * 1e3 / t["steps"] for p in parts}
        step = decode * 1e3 / t["steps"]
        print(
            f"{name:32s} {t['tokens'] / t['wall']:6.1f} {t['step tokens'] / t['steps']:8.2f} {t['prefill']:9.2f} "
            f"{decode:8.2f} "
            + " ".join(f"{per_step[p]:16.2f}" for p in parts)
            + f" {step - sum(per_step.values()):6.2f} {step:6.2f}"
        )
    plain, heads = totals.values()
    end_to_end = (heads["tokens"] / heads["wall"]) / (plain["tokens"] / plain["wall"])
    decode_speedup = (plain["wall"] - plain["prefill"]) / (heads["wall"] - heads["prefill"])
    prefill_share = plain["prefill"] / plain["wall"]
    print(
        f"end to end {end_to_end:.2f}x; decoding alone {decode_speedup:.2f}x; prefill {prefill_share:.0%} of plain"
    )
    if args.target * prefill_share < 1:
        needed = args.target * (1 - prefill_share) / (1 - args.target * prefill_share)
        print(
            f"{args.target:.2f}x end to end with this prefill needs decoding {needed:.2f}x as fast as plain"
        )
    else:
        print(
            f"{args.target:.2f}x end to end is out of reach: prefill alone takes 1/{1 / prefill_share:.1f} of plain"
        )


if __name__ == "__main__":
    main()
