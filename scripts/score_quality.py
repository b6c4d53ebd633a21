"""Task quality of trained models side by side: each model dir's plain greedy answers on the same test prompts,
scored by the eval's scorer (a script for recipe experiments; the eval's quality table is the reference).

    python scripts/score_quality.py runs/task-medusa-lora/model runs/task-lora-alone/model \
        --test-file data/task/test.jsonl --scorer query --num-prompts 12
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medusa_lora.decoding import eos_token_ids
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.run import greedy_quality
from medusa_lora.eval.scoring import load_scorer
from medusa_lora.model.inference import for_inference
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="medusa-lora model dirs (with a LoRA)")
    parser.add_argument("--model", default="smollm2-135m", help="the base")
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--scorer", default="query")
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    scorer = load_scorer(args.scorer)
    rows = []
    for directory in args.models:
        model = for_inference(MedusaLoraModel.from_pretrained(args.model, directory, dtype))
        prompt_format = PromptFormat(model.tokenizer)
        spec = DataSpec(args.test_file, None, None, RecordFields(), "id")
        examples = load_examples(spec, prompt_format, args.num_prompts)
        stop = prompt_format.stop_ids(eos_token_ids(model))
        decode = _decoder(model.tokenizer)
        quality, _ = greedy_quality(
            model, examples, args.max_new_tokens, stop, decode, scorer, desc=directory.name
        )
        rows.append((directory, quality))
    metrics = sorted({k for _, q in rows for k in q if k != "n"})
    print(f"{len(examples)} prompts of {args.test_file}, {args.dtype}, plain greedy")
    print(f"{'model':48s} " + " ".join(f"{m:>16s}" for m in metrics))
    for directory, quality in rows:
        print(f"{directory!s:48s} " + " ".join(f"{100 * quality[m]:15.0f}%" for m in metrics))


def _decoder(tokenizer):
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)


if __name__ == "__main__":
    main()
