"""``medusa-lora generate``: generate text with speculative decoding and print the stats."""

from __future__ import annotations

import argparse
import sys

from medusa_lora.cli.options import (
    add_fast_path_option,
    add_tree_option,
    add_weights_option,
    apply_fast_path_option,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medusa-lora generate", description=__doc__)
    parser.add_argument("prompt", help="the user message (the chat template is applied unless --raw)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="base model: hub id, local dir or smollm2-135m"
    )
    parser.add_argument("--adapter", help="a medusa-lora model dir (LoRA + heads); without it: fresh heads")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    add_tree_option(parser, "calibrated")
    parser.add_argument("--no-speculation", action="store_true", help="plain decoding on the same code path")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument(
        "--no-prepack",
        action="store_true",
        help="keep torch's default CPU GEMM (no oneDNN weight pre-packing)",
    )
    add_weights_option(parser)
    add_fast_path_option(parser)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    apply_fast_path_option(args)

    from transformers import TextStreamer

    from medusa_lora.decoding import eos_token_ids, generate
    from medusa_lora.model.inference import for_inference
    from medusa_lora.model.wrapper import MedusaLoraModel
    from medusa_lora.prompting import PromptFormat

    if args.adapter:
        model = MedusaLoraModel.from_pretrained(args.model, args.adapter)
    else:
        model = MedusaLoraModel.from_base(args.model)
    model = for_inference(model, prepack=not args.no_prepack, weights=args.weights)
    tokenizer = model.tokenizer
    prompt_format = PromptFormat(tokenizer, use_chat_template=not args.raw and bool(tokenizer.chat_template))
    out = generate(
        model,
        prompt_format.encode(args.prompt),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        tree=args.tree,
        speculative=not args.no_speculation,
        seed=args.seed,
        eos_token_id=prompt_format.stop_ids(eos_token_ids(model)),
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    s = out.stats
    print(
        f"\n[{s.new_tokens} tokens in {s.wall_time_s:.2f} s: {s.tokens_per_s:.1f} tok/s, {s.steps} steps, "
        f"{s.mean_accepted_length:.2f} tokens/step, first token after {s.time_to_first_token_s * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return 0
