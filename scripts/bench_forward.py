"""The step's cost on each forward (``verification.forward``): eager on a dynamic cache against the static
forward (CUDA graphs on a GPU), for plain decoding and trees of several sizes (a script, not a test).

    python scripts/bench_forward.py --model smollm2-135m --dtype bf16
    python scripts/bench_forward.py --random-config path/to/config.json   # random weights of that shape

Per tree size: one step's milliseconds (``trees.tuning.measure_step_costs``: heads' drafting + verification,
the fastest of ``--repeats`` rounds after ``--prefix`` cached tokens), then plain ``generate()`` tok/s over
``--new-tokens`` tokens after a ``--prefix``-token prompt, and the tok/s a tree would reach at 5 tokens a step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from medusa_lora.decoding import generate
from medusa_lora.model.base import load_base_model
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import ROOT_ONLY, chain_tree, default_tree
from medusa_lora.trees.tuning import measure_step_costs
from medusa_lora.verification.forward import forward_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a base model (dir, hub id or smollm2-135m)")
    parser.add_argument("--random-config", help="a config.json: random weights of that architecture instead")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.random_config:
        with open(args.random_config) as f:
            config = AutoConfig.for_model(**json.load(f))
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        base = load_base_model(args.model, dtype)
    base = base.to(args.device).eval()
    model = MedusaLoraModel.from_base(base, MedusaConfig(num_heads=4))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}, {args.dtype}, {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters")

    trees = [ROOT_ONLY, chain_tree(4), default_tree(8), default_tree(16), default_tree(32)]
    prompt = torch.randint(0, base.config.vocab_size, (args.prefix,)).tolist()
    rows = {}
    for fast in (False, True):
        label = forward_name(model, fast)
        costs = measure_step_costs(model, trees, args.prefix, args.repeats, fast=fast)
        generate(model, prompt, 8, speculative=False, fast=fast)  # warm (and capture)
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompt, args.new_tokens, speculative=False, fast=fast, eos_token_id=[])
        plain = out.stats.new_tokens / (time.perf_counter() - start)
        rows[label] = (costs, plain)
    print(
        f"ms per step after {args.prefix} tokens (tree nodes), plain generate() tok/s, tok/s at 5 tokens a step:"
    )
    print(f"{'forward':26s} " + " ".join(f"{t.size:>6d}" for t in trees) + f" {'plain':>8s} {'5/step':>8s}")
    for label, (costs, plain) in rows.items():
        ms = [costs[t].total * 1e3 for t in trees]
        print(f"{label:26s} " + " ".join(f"{m:6.2f}" for m in ms) + f" {plain:8.1f} {5e3 / ms[1]:8.1f}")


if __name__ == "__main__":
    main()
