"""``medusa-lora eval``: tok/s of the task model without speculation, with generic and with task Medusa heads,
and with transformers' prompt lookup, on the same test prompts; writes ``report.json`` and ``report.png``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from medusa_lora.base_model import load_base_model, load_tokenizer
from medusa_lora.errors import ConfigError, MedusaLoraError
from medusa_lora.generation import eos_token_ids
from medusa_lora.model import ADAPTER_CONFIG, MedusaLoraModel
from medusa_lora.training.data import Encoder, prompt_text

from .report import REFERENCE_ROW, format_table, plot, write_json
from .run import EvalExample, evaluate
from .task_data import columns_from_prompt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tree(value: str) -> int | str | None:
    if value == "calibrated":
        return None
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a node count >= 1, 'auto' or 'calibrated', got {value!r}")
    return int(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medusa-lora eval", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="base model: smollm2-135m, a dir or a hub id")
    parser.add_argument("--task-adapter", required=True, type=Path, help="medusa-lora dir: task LoRA + heads")
    parser.add_argument("--generic-heads", type=Path, help="medusa-lora dir: heads only, trained on the base")
    parser.add_argument("--test-file", type=Path, default=Path("data/task/test.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=20, help="the first N test prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--tree",
        type=_tree,
        default="auto",
        metavar="N|auto|calibrated",
        help="default-tree node count; auto (default): each model's calibrated tree sized for "
        "this device by measuring step costs; calibrated: the tree saved at training",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed prompts per row before measuring")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/eval"))
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap each prompt in the chat template as a user turn, as training does",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def load_models(
    model: str, task_dir: Path, generic_dir: Path | None, dtype: torch.dtype
) -> tuple[MedusaLoraModel, MedusaLoraModel | None]:
    """The task model and the generic heads on one shared copy of the base weights."""
    base = load_base_model(model, dtype)
    generic = None
    if generic_dir is not None:
        if (generic_dir / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"{generic_dir} holds a LoRA; --generic-heads must be heads-only")
        generic = MedusaLoraModel.from_pretrained(base, generic_dir, dtype)  # before the task LoRA wraps base
    task = MedusaLoraModel.from_pretrained(base, task_dir, dtype)
    task.tokenizer = load_tokenizer(model)
    return task.to("cuda" if torch.cuda.is_available() else "cpu"), generic


def load_examples(path: Path, num_prompts: int, encoder: Encoder) -> list[EvalExample]:
    """The first ``num_prompts`` records of a task jsonl file, tokenised as in training."""
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:num_prompts]
    examples = []
    for record in records:
        prompt = record["prompt"]
        text = prompt_text(encoder.tokenizer, prompt, encoder.use_chat_template)
        ids = encoder.tokenizer(text, add_special_tokens=False).input_ids
        examples.append(EvalExample(record["id"], ids, record["completion"], columns_from_prompt(prompt)))
    return examples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        task, generic = load_models(args.model, args.task_adapter, args.generic_heads, DTYPES[args.dtype])
        tokenizer = task.tokenizer
        if args.chat_template and not tokenizer.chat_template:
            raise ConfigError("the tokenizer has no chat template; pass --no-chat-template")
        encoder = Encoder(tokenizer, args.chat_template, max_length=tokenizer.model_max_length)
        examples = load_examples(args.test_file, args.num_prompts, encoder)
        report = evaluate(
            task,
            generic,
            examples,
            args.max_new_tokens,
            args.tree,
            args.warmup,
            decode=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True),
            stop_token_ids=set(eos_token_ids(task)) | set(encoder.end_ids),
        )
    except (MedusaLoraError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.settings.update(
        model=args.model,
        task_adapter=str(args.task_adapter),
        generic_heads=str(args.generic_heads) if args.generic_heads else None,
        test_file=str(args.test_file),
        dtype=args.dtype,
        chat_template=args.chat_template,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_json(report, args.out_dir / "report.json"), plot(report, args.out_dir / "report.png")
    print(format_table(report))
    print("wrote " + ", ".join(map(str, paths)))
    if report.mismatches:
        detail = "; ".join(
            f"({key}) on {len(ids)} prompt(s): {', '.join(ids[:5])}" for key, ids in report.mismatches.items()
        )
        print(
            f"error: speculative output differs from the greedy output of ({REFERENCE_ROW}): {detail}. "
            "medusa-lora promises identical greedy output. In bf16, rounding can flip near-tied tokens: "
            "rerun with --dtype fp32 to tell rounding from a bug.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
