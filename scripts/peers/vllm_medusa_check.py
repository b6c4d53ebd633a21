"""vLLM's greedy decoding of given prompt token ids, plain or with a Medusa export, run by a peer venv's python.

Reads a JSON job on stdin: {"model", "prompts": [[ids]], "max_new_tokens", "stop_ids", "dtype",
"medusa": an export dir or null, "num_speculative_tokens"}; prints one JSON line: the engine's start-up seconds,
then per prompt (one at a time: batch 1) its tokens and wall time, or {"error": ...} when the engine refuses to
start. As vLLM's users run it: `LLM(...)`, temperature 0.

    .peers/vllm/bin/python scripts/peers/vllm_medusa_check.py < job.json
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    speculative = None
    if job.get("medusa"):
        speculative = {
            "method": "medusa",
            "model": job["medusa"],
            "num_speculative_tokens": job["num_speculative_tokens"],
        }
    start = time.perf_counter()
    try:
        llm = LLM(
            model=job["model"],
            dtype=job["dtype"],
            speculative_config=speculative,
            max_model_len=2048,
            seed=0,
        )
    except (RuntimeError, ValueError) as exc:  # the engine refusing to start is the result
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[-2000:]}))
        return
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=job["stop_ids"])
    results = []
    for prompt in job["prompts"]:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        results.append({"tokens": list(out.outputs[0].token_ids), "wall_s": time.perf_counter() - t0})
    print(json.dumps({"startup_s": started, "results": results}))


if __name__ == "__main__":
    main()
