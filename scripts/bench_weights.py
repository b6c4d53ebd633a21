"""The linear layers of one decoder forward, per weight format and rows per forward (a script, not a test).

Every linear layer of the model's decoder gets its own random weight of its shape (as many matrices as the model
has, so the weights stream from memory as in a real forward, not from cache); a forward of M rows (1: plain
decoding, more: a tree) runs them all. Formats: oneDNN pre-packed fp32 / bf16 (``PackedLinear``) and int8 / int4
weights (``QuantizedLinear``) under fp32 and bf16 activations, on our low-bit kernels (lowbit) and torch's (aten).
Best of 5 rounds, ms.

    python scripts/bench_weights.py --model smollm2-135m --rows 1 4 10 16
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from transformers import AutoConfig

from medusa_lora.kernels._cpu import ENV_VAR, describe
from medusa_lora.model.base import resolve_model_path
from medusa_lora.model.inference import PackedLinear, prepack_supported
from medusa_lora.model.quantize import QuantizedLinear


def layer_shapes(config) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of a Llama-like decoder (q, k, v, o, gate, up, down per layer)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = [
        (q, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, q),
        (inter, hidden),
        (inter, hidden),
        (hidden, inter),
    ]
    return per_layer * config.num_hidden_layers


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_layers(shapes, fmt: str) -> list[nn.Module]:
    dtype_name, _, weights = fmt.partition(":")
    dtype = DTYPES[dtype_name]
    layers = []
    for out_features, in_features in shapes:
        linear = nn.Linear(in_features, out_features, bias=False).to(dtype)
        nn.init.normal_(linear.weight, std=in_features**-0.5)
        if weights:
            layers.append(QuantizedLinear(linear, weights))
        elif prepack_supported(linear.weight):
            layers.append(PackedLinear(linear))
        else:
            layers.append(linear)
    return layers


def forward_ms(layers: list[nn.Module], rows: int, dtype: torch.dtype, rounds: int = 5) -> float:
    inputs = {}
    for layer in layers:
        inputs.setdefault(layer.in_features, torch.randn(rows, layer.in_features, dtype=dtype))
    best = float("inf")
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 10, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--formats",
        default="fp32,bf16,fp32:int8,bf16:int8,fp32:int4,bf16:int4",
        help="activations[:weights], comma-separated",
    )
    parser.add_argument(
        "--kernels",
        default="lowbit,aten",
        help="low-bit kernels to time: lowbit (ours, where it builds) and / or aten (torch's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = layer_shapes(AutoConfig.from_pretrained(resolve_model_path(args.model)))
    runs = []
    for fmt in args.formats.split(","):
        kernels = args.kernels.split(",") if ":" in fmt else ["-"]
        runs += [(fmt, kernel) for kernel in kernels]
    print(f"{len(shapes)} linear layers; ms for a forward of M rows (x: vs 1 row); {describe()}")
    print(f"{'format':<10} {'kernel':<7} " + " ".join(f"{'M=' + str(m):>14}" for m in args.rows))
    with torch.inference_mode():
        for fmt, kernel in runs:
            os.environ[ENV_VAR] = "0" if kernel == "aten" else "1"
            layers = make_layers(shapes, fmt)
            if kernel == "lowbit" and any(layer.quantized.layout != "lowbit" for layer in layers):
                print(f"{fmt:<10} {kernel:<7} (does not run here)")
                continue
            dtype = DTYPES[fmt.partition(":")[0]]
            times = [forward_ms(layers, m, dtype) for m in args.rows]
            cells = [f"{t:>7.1f} ({t / times[0]:.2f})" for t in times]
            print(f"{fmt:<10} {kernel:<7} " + " ".join(f"{c:>14}" for c in cells), flush=True)
            del layers


if __name__ == "__main__":
    main()
