"""Run a real vLLM on our heads (a check with an engine, not a unit test; vLLM in its own venv).

On the same prompt token ids, greedy, one prompt at a time (batch 1), as ``LLM(...)`` users run it:
- vLLM plain;
- per ``--heads`` dir (heads-only, drafting for the base): vLLM's own Medusa on our export
  (``export_heads(..., "vllm")``; a draft vocabulary is vLLM's ``token_map``, which vLLM 0.32 only loads with
  ``model_loader_extra_config={"enable_weights_track": False}``: its loader never reports ``token_map`` loaded),
  and vLLM with our plugin (``medusa_lora.serving.vllm_plugin``) on the same heads;
- with ``--task-model`` (a medusa-lora model dir: the task LoRA and its heads): vLLM plain, vLLM with our plugin
  and vLLM's ngram, each with the LoRA through vLLM's LoRA support (``enable_lora``, a ``LoRARequest``).
Per run: start-up, tok/s (prefill included), outputs identical to vLLM plain (the same LoRA) and to
medusa-lora's greedy output, and vLLM's speculative counters against ``chain_walk``, our replay of the same
chain (our heads on our hidden states): equal counters mean vLLM drafted and accepted our heads' tokens.
Last, medusa-lora's own tree decoding on the same prompts: its tokens per step against the chain's.

    bash scripts/check_vllm.sh   # builds the pinned vLLM venv, then runs this with the arguments given
    python scripts/check_vllm.py --heads eval/tasks/generic_heads/smollm2-135m --task-model MODEL_DIR \
        --test-file data/task/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from medusa_lora.decoding import eos_token_ids, generate
from medusa_lora.drafting.heads import top1_chain
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.formats.export import export_heads
from medusa_lora.model.base import resolve_model_path
from medusa_lora.model.demo import DEMO_MODEL_NAME
from medusa_lora.model.wrapper import ADAPTER_CONFIG, MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields
from medusa_lora.serving.vllm_plugin import HEADS_KEY, PROPOSER

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "scripts" / "peers" / "vllm_medusa_check.py"
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": str(REPO)}
TOKEN_MAP_LOADING = {"model_loader_extra_config": {"enable_weights_track": False}}
LORA_ID = 1  # the LoRARequest id of the task LoRA in the peer script


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
        causes = [line for line in (done.stdout + done.stderr).splitlines() if "Error: " in line]
        if causes:
            result["error"] = causes[-1].split("] ")[-1].strip()
    return result


def chain_walk(
    model: MedusaLoraModel,
    prompt: Sequence[int],
    continuation: Sequence[int],
    depth: int,
    max_new_tokens: int,
    stop_ids: set[int],
) -> dict:
    """vLLM's chain speculation replayed with our heads on our hidden states, as vLLM counts it: each step drafts
    the heads' top-1 path (``top1_chain``) from the hidden state of the last emitted token and accepts the
    prefix that matches ``continuation`` (greedy tokens run on past any stop, ``max_new_tokens + depth + 1`` of
    them), until ``max_new_tokens`` are out or a stop token is."""
    ids = torch.tensor([list(prompt) + list(continuation)], device=model.device)
    hidden = model.hidden_states(ids)[0]
    embeddings = model.causal_lm.get_input_embeddings()
    counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": [0] * depth}
    emitted, row = 1, len(prompt) - 1  # the prefill emits the first token, from the prompt's last row
    while emitted < max_new_tokens and not stop_ids & set(continuation[:emitted]):
        chain = top1_chain(model.heads, hidden[row : row + 1], ids[0, row + 1 : row + 2], embeddings,
                           model.lm_head, depth)[0].tolist()  # fmt: skip
        accepted = 0
        while accepted < depth and chain[accepted] == continuation[emitted + accepted]:
            counts["accepted_per_pos"][accepted] += 1
            accepted += 1
        counts["drafts"] += 1
        counts["draft_tokens"] += depth
        counts["accepted"] += accepted
        emitted += accepted + 1
        row += accepted + 1
    return counts


def total(counts: Sequence[dict]) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
    for c in counts:
        for key in ("drafts", "draft_tokens", "accepted"):
            out[key] += c[key]
        per_pos = c["accepted_per_pos"]
        out["accepted_per_pos"] = [
            a + b for a, b in zip(per_pos, out["accepted_per_pos"] or [0] * len(per_pos))
        ]
    return out


def spec_summary(counts: dict) -> str:
    per_step = (counts["accepted"] + counts["drafts"]) / counts["drafts"] if counts["drafts"] else 0.0
    return (
        f"{counts['drafts']} steps, {counts['accepted']}/{counts['draft_tokens']} drafts accepted "
        f"(per position {counts['accepted_per_pos']}), {per_step:.2f} tokens/step"
    )


def describe(
    name: str, result: dict, reference: dict | None, ours: list[list[int]], walk: dict | None = None
) -> str:
    if "error" in result:
        return f"{name:<44} refused at start: {result['error'].splitlines()[-1][:200]}"
    outputs = [r["tokens"] for r in result["results"]]
    rate = sum(map(len, outputs)) / sum(r["wall_s"] for r in result["results"])
    same_ours = sum(a == b for a, b in zip(outputs, ours))
    same_plain = (
        "-" if reference is None else sum(a == b["tokens"] for a, b in zip(outputs, reference["results"]))
    )
    line = (
        f"{name:<44} started in {result['startup_s']:.0f} s, {rate:.1f} tok/s, identical to vLLM plain "
        f"{same_plain}/{len(outputs)}, to medusa-lora {same_ours}/{len(outputs)}"
    )
    if walk is not None:
        counts = total([r["spec"] for r in result["results"]])
        verdict = "= our replay" if counts == walk else f"!= our replay ({spec_summary(walk)})"
        line += f"\n{'':<46}{spec_summary(counts)} {verdict}"
    elif reference is not None:
        line += f"\n{'':<46}{spec_summary(total([r['spec'] for r in result['results']]))}"
    return line


class Reference:
    """medusa-lora on the prompts: greedy outputs, the chain replay of ``depth`` drafts, and its own tree."""

    def __init__(
        self,
        model: MedusaLoraModel,
        prompts: list[list[int]],
        max_new: int,
        stop_ids: set[int],
        greedy: list[list[int]] | None = None,  # the same base's, when already known
    ) -> None:
        self.model, self.prompts, self.max_new, self.stop_ids = model, prompts, max_new, stop_ids
        with torch.inference_mode():
            self.greedy = greedy or [
                self._generate(p, max_new, list(stop_ids), False).tokens for p in prompts
            ]

    def _generate(self, prompt: list[int], max_new: int, stop: list[int], speculative: bool):
        return generate(
            self.model, prompt, max_new_tokens=max_new, speculative=speculative, eos_token_id=stop
        )

    @torch.inference_mode()
    def walk(self, depth: int) -> dict:
        counts = []
        for prompt in self.prompts:
            continuation = self._generate(prompt, self.max_new + depth + 1, [], speculative=False).tokens
            counts.append(chain_walk(self.model, prompt, continuation, depth, self.max_new, self.stop_ids))
        return total(counts)

    @torch.inference_mode()
    def tree(self) -> str:
        outs = [self._generate(p, self.max_new, list(self.stop_ids), speculative=True) for p in self.prompts]
        same = sum(o.tokens == g for o, g in zip(outs, self.greedy))
        steps = sum(o.stats.steps for o in outs)
        per_step = sum(sum(o.stats.accepted_lengths) for o in outs) / steps
        rate = sum(o.stats.new_tokens for o in outs) / sum(o.stats.wall_time_s for o in outs)
        return f"{steps} steps, {per_step:.2f} tokens/step, {rate:.1f} tok/s, identical {same}/{len(outs)}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", default=".peers/vllm/bin/python")
    parser.add_argument("--model", default=DEMO_MODEL_NAME)
    parser.add_argument(
        "--heads", type=Path, action="append", default=[], help="heads-only dirs for the base"
    )
    parser.add_argument("--task-model", type=Path, help="a medusa-lora model dir with its LoRA and heads")
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="for --heads")
    parser.add_argument("--task-speculative-tokens", type=int, help="for --task-model (default: its heads)")
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--ngram-max", type=int, default=4)
    args = parser.parse_args()
    dtype, depth = getattr(torch, args.dtype), args.num_speculative_tokens
    plain_model = MedusaLoraModel.from_base(args.model, dtype=dtype)
    prompt_format = PromptFormat(plain_model.tokenizer)
    spec = DataSpec(args.test_file, None, None, RecordFields(), "id")
    prompts = [e.prompt_ids for e in load_examples(spec, prompt_format, args.num_prompts)]
    stop_ids = set(prompt_format.stop_ids(eos_token_ids(plain_model)))
    job = {
        "model": resolve_model_path(args.model),
        "prompts": prompts,
        "max_new_tokens": args.max_new_tokens,
        "stop_ids": sorted(stop_ids),
        "dtype": args.dtype,
    }
    chain = {"num_speculative_tokens": depth}
    plugin = {"method": "custom_class", "model": PROPOSER, **chain}

    def report(line: str) -> None:
        print(line, flush=True)

    trees = []
    if args.heads:
        base = Reference(plain_model, prompts, args.max_new_tokens, stop_ids)
        plain = run_vllm(args.vllm_python, job)
        report(describe("vLLM plain", plain, None, base.greedy))
        with tempfile.TemporaryDirectory(prefix="medusa-lora-vllm-") as tmp:
            for heads in args.heads:
                model = MedusaLoraModel.from_pretrained(args.model, heads, dtype)
                walk = Reference(model, prompts, args.max_new_tokens, stop_ids, base.greedy)
                counts = walk.walk(depth)
                export = export_heads(model, Path(tmp, heads.name), "vllm")
                medusa = {"method": "medusa", "model": str(export), **chain}
                runs = [
                    (
                        f"vLLM medusa, {heads.name} export",
                        {"speculative": medusa, "engine": TOKEN_MAP_LOADING},
                    ),
                    (f"vLLM + plugin, {heads.name}", {"speculative": plugin, "engine": _heads(str(heads))}),
                ]
                for name, extra in runs:
                    result = run_vllm(args.vllm_python, {**job, **extra})
                    report(describe(name, result, plain, base.greedy, counts))
                trees.append((heads.name, walk))
    if args.task_model is not None:
        task = MedusaLoraModel.from_pretrained(args.model, args.task_model, dtype)
        depth = args.task_speculative_tokens or task.config.num_heads
        chain = {"num_speculative_tokens": depth}
        plugin = {**plugin, **chain}
        ours = Reference(task, prompts, args.max_new_tokens, stop_ids)
        rank = json.loads((args.task_model / ADAPTER_CONFIG).read_text())["r"]
        lora = {"lora": {"path": str(args.task_model.resolve()), "rank": rank}}
        plain = run_vllm(args.vllm_python, {**job, **lora})
        report(describe("vLLM plain + LoRA", plain, None, ours.greedy))
        heads = _heads({str(LORA_ID): str(args.task_model.resolve())})
        result = run_vllm(args.vllm_python, {**job, **lora, "speculative": plugin, "engine": heads})
        report(describe("vLLM + plugin + LoRA", result, plain, ours.greedy, ours.walk(depth)))
        ngram = {"method": "ngram", "prompt_lookup_min": args.ngram_min, "prompt_lookup_max": args.ngram_max}
        result = run_vllm(args.vllm_python, {**job, **lora, "speculative": {**ngram, **chain}})
        report(describe(f"vLLM ngram {args.ngram_min}-{args.ngram_max} + LoRA", result, plain, ours.greedy))
        trees.append((f"{args.task_model.name} (LoRA)", ours))
    for name, reference in trees:
        report(f"medusa-lora's own tree, {name}: {reference.tree()}")
    report(
        f"\n{len(prompts)} prompts from {args.test_file}, {args.max_new_tokens} new tokens, {args.dtype}, "
        f"greedy, batch 1, {args.num_speculative_tokens} speculative tokens for --heads, {depth} for the task"
    )


def _heads(heads: str | dict[str, str]) -> dict:
    return {"additional_config": {HEADS_KEY: heads}}


if __name__ == "__main__":
    main()
