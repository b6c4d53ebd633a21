"""Run a real vLLM on our exports (a check with an engine, not a unit test; vLLM in its own venv).

For each heads dir: ``export_heads(..., "vllm")``, then vLLM's ``LLM(...)`` with that Medusa draft model on the
same prompt token ids, greedy, one prompt at a time; against vLLM plain decoding and medusa-lora's own plain
greedy output. Prints whether the engine started, outputs identical, and tok/s (batch 1, prefill included).
With ``--full-vocab-too``, a draft-vocabulary export is also run without its ``token_map`` (a diagnostic: the
heads then score the whole vocabulary, so they draft differently from ours).

    bash scripts/peers/install_vllm.sh
    python scripts/check_vllm.py --heads eval/tasks/generic_heads/smollm2-135m --test-file data/task/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medusa_lora.decoding import eos_token_ids, generate
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.formats.export import export_heads
from medusa_lora.model.base import resolve_model_path
from medusa_lora.model.demo import DEMO_MODEL_NAME
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields

PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "vllm_medusa_check.py"
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"}


def run_vllm(python: str, job: dict) -> dict:
    done = subprocess.run(
        [python, str(PEER_SCRIPT)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **ENGINE_ENV},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(('{"startup_s"', '{"error"'))]
    if not lines:
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    result = json.loads(lines[-1])
    if "error" in result:  # the root cause is logged by the engine's worker process
        causes = [line for line in (done.stdout + done.stderr).splitlines() if "ValueError: " in line]
        if causes:
            result["error"] = causes[-1].split("] ")[-1].strip()
    return result


def without_token_map(export: Path, out: Path) -> Path:
    """The export with a full-vocabulary LM head: no ``token_map``, no ``truncated_vocab_size``."""
    out.mkdir(parents=True)
    tensors = load_file(export / "model.safetensors")
    tensors.pop("token_map")
    save_file(tensors, out / "model.safetensors")
    config = json.loads((export / "config.json").read_text())
    config.pop("truncated_vocab_size")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def describe(name: str, result: dict, reference: dict | None, ours: list[list[int]]) -> str:
    if "error" in result:
        return f"{name:<40} refused at start: {result['error'].splitlines()[-1][:160]}"
    outputs = [r["tokens"] for r in result["results"]]
    rate = sum(map(len, outputs)) / sum(r["wall_s"] for r in result["results"])
    same_ours = sum(a == b for a, b in zip(outputs, ours))
    same_plain = (
        "-" if reference is None else sum(a == b["tokens"] for a, b in zip(outputs, reference["results"]))
    )
    return (
        f"{name:<40} started in {result['startup_s']:.0f} s, {rate:.1f} tok/s, identical to vLLM plain "
        f"{same_plain}/{len(outputs)}, to medusa-lora plain {same_ours}/{len(outputs)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", default=".peers/vllm/bin/python")
    parser.add_argument("--model", default=DEMO_MODEL_NAME)
    parser.add_argument(
        "--heads", type=Path, action="append", required=True, help="heads-only medusa-lora dirs"
    )
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--full-vocab-too", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    plain_model = MedusaLoraModel.from_base(args.model, dtype=dtype)
    prompt_format = PromptFormat(plain_model.tokenizer)
    spec = DataSpec(args.test_file, None, None, RecordFields(), "id")
    prompts = [e.prompt_ids for e in load_examples(spec, prompt_format, args.num_prompts)]
    stop_ids = prompt_format.stop_ids(eos_token_ids(plain_model))
    with torch.inference_mode():
        ours = [
            generate(
                plain_model, p, max_new_tokens=args.max_new_tokens, speculative=False, eos_token_id=stop_ids
            ).tokens
            for p in prompts
        ]
    job = {
        "model": resolve_model_path(args.model),
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "stop_ids": list(stop_ids),
        "dtype": args.dtype,
        "medusa": None,
        "num_speculative_tokens": args.num_speculative_tokens,
    }
    plain = run_vllm(args.vllm_python, job)
    lines = [describe("vLLM plain", plain, None, ours)]
    print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="medusa-lora-vllm-") as tmp:
        for heads in args.heads:
            export = export_heads(
                MedusaLoraModel.from_pretrained(args.model, heads, dtype), Path(tmp, heads.name), "vllm"
            )
            runs = [(f"vLLM medusa, {heads.name} export", export)]
            if args.full_vocab_too and "token_map" in load_file(export / "model.safetensors"):
                runs.append(("  the same without token_map", without_token_map(export, Path(tmp, "full"))))
            for name, directory in runs:
                lines.append(
                    describe(name, run_vllm(args.vllm_python, {**job, "medusa": str(directory)}), plain, ours)
                )
                print(lines[-1], flush=True)
    print(
        f"\n{len(prompts)} prompts from {args.test_file}, {args.max_new_tokens} new tokens, {args.dtype}, greedy"
    )


if __name__ == "__main__":
    main()
