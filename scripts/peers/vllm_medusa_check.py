"""vLLM's greedy decoding of given prompt token ids, plain or speculative, run by a peer venv's python.

Reads a JSON job on stdin: {"model", "prompts": [[ids]], "max_new_tokens", "stop_ids", "dtype",
"speculative": vLLM's speculative_config or null, "lora": {"path", "rank"} or null (the task LoRA, through
vLLM's LoRA support: enable_lora + a LoRARequest on every prompt), "engine": more LLM(...) keyword arguments
(e.g. model_loader_extra_config, additional_config), "ttft": true to also time a 1-token request per prompt
first (its time to the first token; vLLM's prefix cache is off, so the full request recomputes it)}; prints one JSON line: the engine's start-up seconds,
then per prompt (one at a time: batch 1) its tokens, wall time and the speculative counters it moved
(drafts, draft tokens, accepted tokens, accepted per position), or {"error": ...} when the engine refuses to
start. As vLLM's users run it: `LLM(...)`, temperature 0.

    .peers/vllm/bin/python scripts/peers/vllm_medusa_check.py < job.json
"""

from __future__ import annotations

import json
import sys
import time

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def spec_counts(llm) -> dict:
    """The engine's speculative counters now (zeros without speculative decoding)."""
    counts: dict = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            counts[SPEC_COUNTERS[metric.name]] = metric.value
        elif metric.name == PER_POSITION:
            counts["accepted_per_pos"] = list(metric.values)
    return counts


def moved(before: dict, after: dict) -> dict:
    per_pos = after["accepted_per_pos"]
    old = before["accepted_per_pos"] or [0] * len(per_pos)
    return {
        **{k: after[k] - before[k] for k in ("drafts", "draft_tokens", "accepted")},
        "accepted_per_pos": [a - b for a, b in zip(per_pos, old)],
    }


def main() -> None:
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora = job.get("lora")
    engine = dict(job.get("engine") or {})
    if lora:
        engine.update(enable_lora=True, max_lora_rank=lora["rank"], max_loras=1)
    start = time.perf_counter()
    try:
        llm = LLM(
            model=job["model"],
            dtype=job["dtype"],
            speculative_config=job.get("speculative"),
            max_model_len=2048,
            seed=0,
            disable_log_stats=False,
            enable_prefix_caching=False,  # each request computes its prompt: the 1-token timing stays honest
            **engine,
        )
    except (RuntimeError, ValueError) as exc:  # the engine refusing to start is the result
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[-2000:]}))
        return
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=job["stop_ids"])
    request = LoRARequest("task", 1, lora["path"]) if lora else None
    first = SamplingParams(temperature=0.0, max_tokens=1)
    results = []
    for prompt in job["prompts"]:
        ttft = None
        if job.get("ttft"):  # a 1-token request first: its wall time is the prompt's time to the first token
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], first, use_tqdm=False, lora_request=request)
            ttft = time.perf_counter() - t0
        before = spec_counts(llm)
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False, lora_request=request)[0]
        wall = time.perf_counter() - t0
        results.append(
            {
                "tokens": list(out.outputs[0].token_ids),
                "wall_s": wall,
                "ttft_s": ttft,
                "spec": moved(before, spec_counts(llm)),
            }
        )
    print(json.dumps({"startup_s": started, "results": results}))


if __name__ == "__main__":
    main()
