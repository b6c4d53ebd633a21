"""llama.cpp's greedy decoding of given prompt token ids, run by a peer venv's python (llama-cpp-python only).

Reads a JSON job on stdin: {"gguf", "prompts": [[ids]], "max_new_tokens", "stop_ids", "threads", "n_ctx",
"lookup": 0 or the prompt-lookup draft length}; prints one JSON line: per prompt its tokens, the time to the
first token and the wall time. Run as llama.cpp's users run it: its own sampler at temperature 0 (top-k 1),
no repeat penalty, prompt lookup through llama-cpp-python's LlamaPromptLookupDecoding.

    scripts/peers/install_llama_cpp.sh   # builds llama-cpp-python into .peers/llama-cpp (about 20 min)
"""

from __future__ import annotations

import json
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding


def main() -> None:
    job = json.load(sys.stdin)
    draft = LlamaPromptLookupDecoding(num_pred_tokens=job["lookup"]) if job["lookup"] else None
    llm = Llama(
        job["gguf"],
        n_ctx=job["n_ctx"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_batch=job.get("n_batch", 512),
        draft_model=draft,
        verbose=True,  # verbose=False segfaulted in 0.3.x
        seed=0,
    )
    stop = set(job["stop_ids"])
    results = []
    for prompt in [job["prompts"][0], *job["prompts"]]:  # the first prompt once untimed: warm-up
        tokens: list[int] = []
        start = time.perf_counter()
        first = 0.0
        for token in llm.generate(
            prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
        ):
            if not tokens:
                first = time.perf_counter() - start
            tokens.append(int(token))
            if token in stop or len(tokens) >= job["max_new_tokens"]:
                break
        results.append({"tokens": tokens, "ttft_s": first, "wall_s": time.perf_counter() - start})
    print(json.dumps({"results": results[1:]}))


if __name__ == "__main__":
    main()
