"""One decoder + LM-head forward of T tokens after P cached ones: eager against ``torch.compile`` (a script, not a
test).

- eager-dynamic: the model as ``generate()`` runs it today (pre-packed linears, a ``DynamicCache``);
- eager-static: the same on a ``StaticCache`` of ``--cache-len`` with a 4D mask and tensor positions;
- compiled: that static step under ``torch.compile(dynamic=False)`` with inductor's freezing (it packs the
  weights itself), optionally its C++ wrapper. Reports the first call (the compile) and the median of 30.

    python scripts/bench_compile.py --dtype bf16 --mode eager-dynamic eager-static compiled
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, StaticCache

from medusa_lora.model.base import load_base_model
from medusa_lora.model.inference import prepack_linears
from medusa_lora.verification.kv_cache import truncate_cache


def causal_mask(start: int, tokens: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, L) additive: the prefix and the causal part of the new tokens visible."""
    mask = torch.full((1, 1, tokens, length), torch.finfo(dtype).min, dtype=dtype)
    mask[..., :start] = 0
    mask[0, 0, :, start : start + tokens].masked_fill_(torch.ones(tokens, tokens, dtype=torch.bool).tril(), 0)
    return mask


def measure(mode: str, args: argparse.Namespace, dtype: torch.dtype, prompt: torch.Tensor) -> None:
    """Print the first call and the median step of ``mode`` for each token count."""
    model = load_base_model(args.model, dtype).eval()
    model.set_attn_implementation("sdpa")
    if mode != "compiled":
        prepack_linears(model)
    else:
        import torch._inductor.config as inductor

        inductor.freezing, inductor.cpp_wrapper = True, args.cpp_wrapper
    with torch.inference_mode():
        if mode == "eager-dynamic":
            cache = DynamicCache(config=model.config)
            model.model(input_ids=prompt, past_key_values=cache, use_cache=True)

            def step(x, positions, cache=cache):
                out = model.model(
                    input_ids=x, position_ids=positions[None], past_key_values=cache, use_cache=True
                )
                truncate_cache(cache, args.prefix)  # every call after the same prefix
                return model.lm_head(out.last_hidden_state)
        else:
            cache = StaticCache(config=model.config, max_cache_len=args.cache_len)

            def forward(x, positions, mask, cache=cache):
                hidden = model.model(
                    input_ids=x,
                    position_ids=positions[None],
                    past_key_values=cache,
                    cache_position=positions,
                    attention_mask=mask,
                    use_cache=True,
                ).last_hidden_state
                return model.lm_head(hidden)

            forward(prompt, torch.arange(args.prefix), causal_mask(0, args.prefix, args.cache_len, dtype))
            run = torch.compile(forward, dynamic=False) if mode == "compiled" else forward

            def step(x, positions, run=run):
                return run(x, positions, causal_mask(args.prefix, x.shape[1], args.cache_len, dtype))

        for tokens in args.tokens:
            x, positions = (
                torch.randint(0, 1000, (1, tokens)),
                torch.arange(args.prefix, args.prefix + tokens),
            )
            start = time.perf_counter()
            step(x, positions)
            first = time.perf_counter() - start
            times = []
            for _ in range(30):
                start = time.perf_counter()
                step(x, positions)
                times.append(time.perf_counter() - start)
            print(
                f"{mode:<14} T={tokens:<3} first call {first:6.1f} s   median {statistics.median(times) * 1e3:6.1f} ms",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--mode", nargs="+", default=["eager-dynamic", "eager-static", "compiled"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--prefix", type=int, default=100)
    parser.add_argument("--cache-len", type=int, default=512)
    parser.add_argument(
        "--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (less Python per call)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    prompt = torch.randint(0, 1000, (1, args.prefix))
    for mode in args.mode:
        measure(mode, args, dtype, prompt)


if __name__ == "__main__":
    main()
