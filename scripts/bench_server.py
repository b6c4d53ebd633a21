"""Bounded load benchmark of ``medusa-lora serve`` (a script, not a test).

Starts the server in this process on 127.0.0.1 (a free port, loopback only), then for each adapter, with
speculation on and off (the ``speculative`` request extension), sends ``--requests`` greedy chat requests
from ``--clients`` concurrent clients (the real ``openai`` client) and prints throughput (completion tokens
per wall second), p50/p99 end-to-end latency (queueing included: the server runs one request at a time),
and the tokens per step the heads achieved. It stops by itself.

    python scripts/bench_server.py --model smollm2-135m --adapter query=runs/task-medusa-lora/model \\
        --prompts data/task/test.jsonl --clients 4 --requests 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import uvicorn

from medusa_lora.serving.app import create_app
from medusa_lora.serving.registry import Registry


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def start_server(registry: Registry, queue_size: int) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(registry, queue_size), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def run_load(client: openai.OpenAI, model: str, prompts: list[str], args, speculative: bool) -> dict:
    """``args.requests`` requests from ``args.clients`` threads; per-request latency and stats."""

    def one(i: int) -> tuple[float, int, float]:
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body={"speculative": speculative},
        )
        medusa = response.model_extra["medusa"]
        return time.perf_counter() - start, response.usage.completion_tokens, medusa["tokens_per_step"]

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "model": model,
        "speculative": speculative,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "tokens_per_step": statistics.mean(r[2] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--prompts", type=Path, required=True, help="jsonl with a 'prompt' field per line")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=8, help="requests per adapter and mode")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--tree", default="calibrated", help="calibrated, auto or a node count")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = dict(item.split("=", 1) for item in args.adapter)
    with args.prompts.open(encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    tree = int(args.tree) if args.tree.isdigit() else args.tree
    registry = Registry.load(args.model, {k: Path(v) for k, v in adapters.items()}, tree=tree)
    server, url = start_server(registry, queue_size=args.clients)
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    rows = []
    try:
        for name in adapters:
            run_load(
                client, name, prompts, argparse.Namespace(**{**vars(args), "requests": 1}), True
            )  # warm-up
            for speculative in (True, False):
                rows.append(run_load(client, name, prompts[1:], args, speculative))
    finally:
        server.should_exit = True
    print(f"{args.clients} clients, {args.requests} requests per row, max_tokens {args.max_tokens}, greedy")
    print(
        "| adapter | speculative | requests | tok/s (throughput) | p50 latency s | p99 latency s | tok/step |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {'yes' if r['speculative'] else 'no'} | {r['requests']} | "
            f"{r['throughput_tok_s']:.1f} | {r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | "
            f"{r['tokens_per_step']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
