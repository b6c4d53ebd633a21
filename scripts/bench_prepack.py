"""What one decode step costs with T tokens (1 = plain decoding, more = a tree), with torch's default CPU
linear layers and with the weights pre-packed for oneDNN (``medusa_lora.model.inference``). A script, not a test.

    python scripts/bench_prepack.py --model smollm2-135m --prefix 256

Prints, per token count, the median milliseconds of a decoder + LM-head forward over ``--prefix`` cached
tokens, each relative to the 1-token forward of the same kind; the two models are timed interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from medusa_lora.model.inference import for_inference
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.verification.kv_cache import truncate_cache


@torch.inference_mode()
def step_ms(model: MedusaLoraModel, cache: DynamicCache, prefix: int, tokens: int) -> float:
    ids = torch.randint(0, model.model_config.vocab_size, (1, tokens))
    start = time.perf_counter()
    hidden = model.hidden_states(ids, position_ids=torch.arange(prefix, prefix + tokens)[None], cache=cache)
    model.lm_head(hidden)
    elapsed = time.perf_counter() - start
    truncate_cache(cache, prefix)
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens before the step")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    models = {
        "default": MedusaLoraModel.from_base(args.model).eval(),
        "prepacked": for_inference(MedusaLoraModel.from_base(args.model)),
    }
    prompt = torch.randint(0, 1000, (1, args.prefix))
    caches = {}
    with torch.inference_mode():
        for name, model in models.items():
            caches[name] = DynamicCache(config=model.model_config)
            model.hidden_states(prompt, cache=caches[name])
    times: dict[str, dict[int, list[float]]] = {name: {t: [] for t in args.tokens} for name in models}
    for round_ in range(args.repeats + 2):  # two warm-up rounds
        for tokens in args.tokens:
            for name, model in models.items():
                ms = step_ms(model, caches[name], args.prefix, tokens)
                if round_ >= 2:
                    times[name][tokens].append(ms)
    median = {name: {t: statistics.median(v) for t, v in per.items()} for name, per in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.prefix} cached tokens")
    print(
        f"{'tokens':>6}  {'default ms':>10}  {'vs 1 token':>10}  {'prepacked ms':>12}  {'vs 1 token':>10}  {'speedup':>7}"
    )
    for t in args.tokens:
        d, p = median["default"][t], median["prepacked"][t]
        print(
            f"{t:>6}  {d:>10.1f}  {d / median['default'][args.tokens[0]]:>9.2f}x  {p:>12.1f}  "
            f"{p / median['prepacked'][args.tokens[0]]:>9.2f}x  {d / p:>6.2f}x"
        )


if __name__ == "__main__":
    main()
