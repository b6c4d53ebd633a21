"""Serving a QLoRA model: its 4-bit base with the LoRA unmerged against the merged dense model, fp32 and bf16 (a
script, not a test).

    python scripts/bench_qlora.py runs/qlora-bench/model --test-file data/task/test.jsonl --num-prompts 4

``model_dir`` is a medusa-lora model trained with ``load_in_4bit``. Plain greedy decoding (no speculation: the
rows compare the model's forward alone), each prompt running every row in an order that rotates from prompt to
prompt, after one untimed prompt per row. Rows:

- ``4-bit, LoRA unmerged`` (``for_inference(merge=False)``): the QLoRA model as trained; bitsandbytes dequantizes
  each weight at every forward and multiplies in the compute dtype. The reference of the "same" column.
- ``4-bit, bnb bf16 kernel``, on a CPU with AVX-512 BF16: the same with bitsandbytes' own CPU inference kernel,
  which multiplies in bf16 (``model.qlora`` switches it off, since training did not compute so).
- ``merged fp32`` / ``merged bf16`` (``for_inference``): the base dequantized as trained, the LoRA merged in, in
  that dtype, oneDNN pre-packed.

Prints the median tok/s over the prompts and how many prompts' tokens equal the reference's.
"""

from __future__ import annotations

import argparse
import statistics

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import has_avx512bf16

from medusa_lora.decoding import eos_token_ids, generate
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.peers import rotated
from medusa_lora.model.inference import for_inference, freeze_gc
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields

REFERENCE = "4-bit, LoRA unmerged"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a medusa-lora model trained with load_in_4bit")
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    def load(dtype: torch.dtype = torch.float32) -> MedusaLoraModel:
        return MedusaLoraModel.from_pretrained(None, args.model_dir, dtype=dtype)

    models = {REFERENCE: for_inference(load(), merge=False)}
    if not any(isinstance(m, bnb.nn.Linear4bit) for m in models[REFERENCE].modules()):
        parser.error(f"{args.model_dir} was not trained on a 4-bit base (load_in_4bit)")
    if has_avx512bf16():
        kernel = for_inference(load(), merge=False)
        for module in kernel.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True  # what model.qlora switches off
        models["4-bit, bnb bf16 kernel"] = kernel
    models["merged fp32"] = for_inference(load())
    models["merged bf16"] = for_inference(load(torch.bfloat16))
    freeze_gc()
    reference = models[REFERENCE]
    prompt_format = PromptFormat(reference.tokenizer, True)
    examples = load_examples(
        DataSpec(args.test_file, None, None, RecordFields(), "id"), prompt_format, args.num_prompts
    )
    stop = prompt_format.stop_ids(eos_token_ids(reference))

    def run(model: MedusaLoraModel, prompt: list[int]):
        return generate(model, prompt, args.max_new_tokens, speculative=False, eos_token_id=stop)

    for model in models.values():  # untimed
        run(model, examples[0].prompt_ids)
    outputs: dict[str, list] = {name: [] for name in models}
    for n, example in enumerate(examples):
        for name in rotated(list(models), n):
            outputs[name].append(run(models[name], example.prompt_ids))
    print(
        f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.get_num_threads()} threads; "
        f"{len(examples)} prompts, {args.max_new_tokens} new tokens at most, plain greedy decoding"
    )
    print(f"{'row':<24} {'tok/s':>7} {'tokens':>7}  same tokens as {REFERENCE}")
    for name, outs in outputs.items():
        speed = statistics.median(out.stats.tokens_per_s for out in outs)
        same = sum(out.tokens == ref.tokens for out, ref in zip(outs, outputs[REFERENCE]))
        tokens = sum(len(out.tokens) for out in outs)
        print(f"{name:<24} {speed:>7.1f} {tokens:>7}  {same}/{len(outs)}")


if __name__ == "__main__":
    main()
