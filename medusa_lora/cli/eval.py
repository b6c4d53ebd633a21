"""``medusa-lora eval``: tok/s of the task model without speculation, drafted by generic and by its own
Medusa heads, and with tuned peers (prompt lookup, suffix decoding), on the same prompts of any dataset
``medusa-lora train`` accepts; writes ``report.json`` and ``report.png``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from medusa_lora.cli.options import (
    DTYPE_NAMES,
    add_fast_path_option,
    add_tree_option,
    add_weights_option,
    apply_fast_path_option,
    torch_dtype,
)
from medusa_lora.decoding import eos_token_ids
from medusa_lora.errors import ConfigError, MedusaLoraError
from medusa_lora.eval.examples import DataSpec, load_examples
from medusa_lora.eval.report import REFERENCE_ROW, format_quality_table, format_table, plot, write_json
from medusa_lora.eval.run import evaluate, load_lora_alone, load_models
from medusa_lora.eval.scoring import BUILTIN, load_scorer
from medusa_lora.model.inference import freeze_gc
from medusa_lora.prompting import PromptFormat
from medusa_lora.records import RecordFields


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medusa-lora eval", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="base model: smollm2-135m, a dir or a hub id")
    parser.add_argument("--task-adapter", required=True, type=Path, help="medusa-lora dir: task LoRA + heads")
    parser.add_argument("--generic-heads", type=Path, help="medusa-lora dir: heads only, trained on the base")
    parser.add_argument(
        "--lora-alone",
        type=Path,
        help="medusa-lora dir of the task LoRA trained alone (mode: lora, same data and steps): its greedy "
        "answers are scored beside the task model's in a quality table (needs a --scorer)",
    )
    data = parser.add_argument_group("data (the formats `medusa-lora train` reads; prompts-only files too)")
    data.add_argument("--test-file", help="jsonl/json/parquet/csv file, or a hub dataset name with --split")
    data.add_argument("--split", help="hub dataset split of the test prompts (default: test)")
    data.add_argument("--dataset-config", help="hub dataset config name")
    data.add_argument(
        "--validation-file",
        help="prompts that tune the peers (rows d, e); default: the test file's records after --num-prompts",
    )
    data.add_argument("--validation-split", help="hub dataset split of the validation prompts")
    data.add_argument("--prompt-field", default="prompt")
    data.add_argument("--completion-field", default="completion", help="the reference answer, if present")
    data.add_argument(
        "--messages-field", default="messages", help="chat records: the last assistant turn is the reference"
    )
    data.add_argument("--id-field", default="id")
    parser.add_argument("--num-prompts", type=int, default=20, help="the first N test prompts")
    parser.add_argument(
        "--num-validation-prompts", type=int, default=4, help="prompts that tune the peers (0: no peer rows)"
    )
    parser.add_argument(
        "--scorer",
        default="exact",
        help=f"quality scorer: {', '.join([*BUILTIN, 'none'])}, module:function or file.py:function",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_tree_option(parser, "auto", "the trees of the head rows (at least 2 nodes with auto)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prompts per row before measuring")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/eval"))
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="format prompts with the chat template, as training does",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--prepack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a CPU, pre-pack linear weights for oneDNN (all rows alike; see medusa_lora.model.inference)",
    )
    add_weights_option(parser)
    add_fast_path_option(parser)
    args = parser.parse_args(argv)
    if args.test_file is None:
        parser.error("--test-file is required")
    for name in ("num_prompts", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_validation_prompts < 0 or args.warmup < 0:
        parser.error("--num-validation-prompts and --warmup must be >= 0")
    return args


def data_spec(args: argparse.Namespace, source: str, split: str | None) -> DataSpec:
    fields = RecordFields(args.prompt_field, args.completion_field, args.messages_field)
    return DataSpec(source, split, args.dataset_config, fields, args.id_field)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_fast_path_option(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scorer = load_scorer(args.scorer)
        task, generic = load_models(
            args.model,
            args.task_adapter,
            args.generic_heads,
            torch_dtype(args.dtype),
            args.prepack,
            weights=args.weights,
        )
        lora_alone = None
        if args.lora_alone is not None:
            if scorer is None:
                raise ConfigError("--lora-alone compares answer quality: it needs a --scorer other than none")
            lora_alone = load_lora_alone(
                args.model, args.lora_alone, torch_dtype(args.dtype), args.prepack, args.weights
            )
        freeze_gc()  # no full garbage collection pauses inside the timed rows
        tokenizer = task.tokenizer
        prompt_format = PromptFormat(tokenizer, args.chat_template)
        test = data_spec(args, args.test_file, args.split)
        examples = load_examples(test, prompt_format, args.num_prompts)
        if args.validation_file is not None:
            validation_spec = data_spec(args, args.validation_file, args.validation_split)
            validation = load_examples(validation_spec, prompt_format, args.num_validation_prompts)
        else:
            validation = load_examples(
                test, prompt_format, args.num_validation_prompts, offset=args.num_prompts
            )
        if args.num_validation_prompts and not validation:
            raise ConfigError(
                f"no validation prompts to tune the peers: {args.test_file} has no records after the first "
                f"{args.num_prompts}; pass --validation-file, or --num-validation-prompts 0 to leave the peers out"
            )
        report = evaluate(
            task,
            generic,
            examples,
            args.max_new_tokens,
            args.tree,
            args.warmup,
            decode=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True),
            stop_token_ids=prompt_format.stop_ids(eos_token_ids(task)),
            scorer=scorer,
            validation=validation,
            lora_alone=lora_alone,
        )
    except (MedusaLoraError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.settings.update(
        model=args.model,
        task_adapter=str(args.task_adapter),
        generic_heads=str(args.generic_heads) if args.generic_heads else None,
        lora_alone=str(args.lora_alone) if args.lora_alone else None,
        test_file=args.test_file,
        validation_file=args.validation_file,
        scorer=args.scorer,
        dtype=args.dtype,
        weights=args.weights,
        chat_template=args.chat_template,
        prepacked_linears=args.prepack and task.device.type == "cpu",
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_json(report, args.out_dir / "report.json"), plot(report, args.out_dir / "report.png")
    env = report.environment
    print(f"{env['gpu'] or env['cpu']}, {args.dtype}, forward: {env['forward']}")
    print(format_table(report))
    if report.quality_rows:
        print("\n" + format_quality_table(report))
    print("wrote " + ", ".join(map(str, paths)))
    return _check_identical(
        report, args.dtype if args.weights is None else f"{args.dtype} on {args.weights} weights"
    )


def _check_identical(report, dtype: str) -> int:
    """Greedy speculative output must equal row (a)'s: a failure (exit 1) in fp32, where it is a bug; in bf16
    or on low-bit weights multi-token forwards may round differently from one-token ones, so near-tied tokens
    may flip: reported."""
    if not report.mismatches:
        return 0
    detail = "; ".join(
        f"({key}) on {len(ids)} prompt(s): {', '.join(ids[:5])}" for key, ids in report.mismatches.items()
    )
    if dtype != "fp32":
        print(
            f"note: in {dtype}, speculative output differs from ({REFERENCE_ROW})'s greedy output {detail}. "
            "Multi-token forwards round differently from one-token forwards, so near-tied tokens can flip; "
            "the identical-output promise holds in fp32.",
            file=sys.stderr,
        )
        return 0
    print(
        f"error: speculative output differs from the greedy output of ({REFERENCE_ROW}): {detail}. "
        "medusa-lora promises identical greedy output in fp32.",
        file=sys.stderr,
    )
    return 1
