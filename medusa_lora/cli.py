"""``medusa-lora``: one console command; each subcommand's own parser lives with the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from medusa_lora.errors import ConfigError, MedusaLoraError

# subcommand -> (module with ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": ("medusa_lora.cli", "write the SmolLM2-135M demo model as a Hugging Face dir (offline)"),
    "make-task-data": ("medusa_lora.eval.tasks.query_data", "generate the built-in NL-to-query task dataset"),
    "make-generic-prompts": (
        "medusa_lora.eval.tasks.generic_prompts",
        "write general prompts (train/validation/test, prompts only) for generic heads and off-task eval",
    ),
    "make-tool-call-data": (
        "medusa_lora.eval.tasks.tool_calls",
        "generate a function-calling task (messages format), to try training and eval on new data",
    ),
    "distill": (
        "medusa_lora.training.distill",
        "answer prompts with the model itself (self-distillation data)",
    ),
    "train": ("medusa_lora.training.cli", "train a Medusa-LoRA, Medusa heads or a LoRA from a YAML config"),
    "generate": ("medusa_lora.cli", "generate text with speculative decoding and print the stats"),
    "eval": ("medusa_lora.eval.__main__", "tok/s table: base vs generic Medusa vs task Medusa-LoRA vs peers"),
    "export": ("medusa_lora.cli", "write heads for serving: vLLM's Medusa draft model, TGI or LoRAX"),
    "import": ("medusa_lora.cli", "bring vLLM/TGI/LoRAX Medusa heads in as a heads-only medusa-lora model"),
    "serve": (
        "medusa_lora.serving.app",
        "serve adapters with their own heads behind an OpenAI-compatible API",
    ),
}


def tree_option(value: str) -> int | str:
    """argparse type of a ``--tree`` option (generate, eval, serve): a node count (a default tree), ``auto`` or
    ``calibrated``, as ``tree_choice.choose_tree`` takes them."""
    from medusa_lora.tree_choice import tree_setting

    try:
        return tree_setting(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def prepare_model_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medusa-lora prepare-model", description=SUBCOMMANDS["prepare-model"][1]
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the prepared model exists")
    args = parser.parse_args(argv)
    from medusa_lora.demo_model import prepare_demo_model

    print(prepare_demo_model(force=args.force))
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medusa-lora generate", description=SUBCOMMANDS["generate"][1])
    parser.add_argument("prompt", help="the user message (the chat template is applied unless --raw)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="base model: hub id, local dir or smollm2-135m"
    )
    parser.add_argument("--adapter", help="a medusa-lora model dir (LoRA + heads); without it: fresh heads")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--tree",
        type=tree_option,
        default="calibrated",
        metavar="N|auto|calibrated",
        help="calibrated (default): the adapter's calibrated tree; auto: the calibrated tree fastest on this "
        "device (measured once); N: a default tree of N nodes",
    )
    parser.add_argument("--no-speculation", action="store_true", help="plain decoding on the same code path")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument(
        "--no-prepack",
        action="store_true",
        help="keep torch's default CPU GEMM (no oneDNN weight pre-packing)",
    )
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)

    from transformers import TextStreamer

    from medusa_lora.generation import eos_token_ids, generate
    from medusa_lora.inference import for_inference
    from medusa_lora.model import MedusaLoraModel
    from medusa_lora.prompting import PromptFormat

    if args.adapter:
        model = MedusaLoraModel.from_pretrained(args.model, args.adapter)
    else:
        model = MedusaLoraModel.from_base(args.model)
    model = for_inference(model, prepack=not args.no_prepack)
    tokenizer = model.tokenizer
    prompt_format = PromptFormat(tokenizer, use_chat_template=not args.raw and bool(tokenizer.chat_template))
    out = generate(
        model,
        prompt_format.encode(args.prompt),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        tree=args.tree,
        speculative=not args.no_speculation,
        seed=args.seed,
        eos_token_id=prompt_format.stop_ids(eos_token_ids(model)),
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    s = out.stats
    print(
        f"\n[{s.new_tokens} tokens in {s.wall_time_s:.2f} s: {s.tokens_per_s:.1f} tok/s, {s.steps} steps, "
        f"{s.mean_accepted_length:.2f} tokens/step, first token after {s.time_to_first_token_s * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medusa-lora export", description=SUBCOMMANDS["export"][1])
    parser.add_argument("adapter", help="a medusa-lora model dir (heads, and a LoRA if any)")
    parser.add_argument(
        "--format",
        required=True,
        choices=["vllm", "tgi", "lorax"],
        help="vllm: config.json + model.safetensors (vLLM's Medusa draft model); tgi: config.json + "
        "medusa_lm_head.safetensors; lorax: the tgi files plus the PEFT adapter, in one adapter dir",
    )
    parser.add_argument("--out", required=True, help="output dir (replaced only with --overwrite)")
    parser.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    parser.add_argument(
        "--merged-base",
        help="also write the base with the LoRA merged in (vllm and tgi need it when there is a LoRA)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace non-empty output dirs")
    args = parser.parse_args(argv)
    from medusa_lora.export import export_heads
    from medusa_lora.model import MedusaLoraModel

    model = MedusaLoraModel.from_pretrained(args.model, args.adapter)
    print(export_heads(model, args.out, args.format, args.merged_base, overwrite=args.overwrite))
    return 0


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medusa-lora import", description=SUBCOMMANDS["import"][1])
    parser.add_argument("directory", help="a vLLM Medusa draft model or a TGI/LoRAX Medusa dir")
    parser.add_argument("--out", required=True, help="the heads-only medusa-lora model dir to write")
    parser.add_argument(
        "--model", help="base model (default: the export's base_model_name_or_path; vLLM exports need it)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    from medusa_lora.import_heads import import_heads

    print(import_heads(args.directory, args.out, args.model, overwrite=args.overwrite))
    return 0


_LOCAL: dict[str, Callable[[list[str] | None], int]] = {
    "prepare-model": prepare_model_main,
    "generate": generate_main,
    "export": export_main,
    "import": import_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="medusa-lora",
        description="Medusa heads trained jointly with a task LoRA: faster generation, identical greedy output.",
        epilog="Run 'medusa-lora <command> --help' for a command's options.",
    )
    parser.add_argument(
        "command", choices=list(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in SUBCOMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    try:
        if args.command in _LOCAL:
            return _LOCAL[args.command](argv[1:])
        module = importlib.import_module(SUBCOMMANDS[args.command][0])
        return int(module.main(argv[1:]) or 0)
    except MedusaLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:  # a missing or unreadable file, a model name that is neither a dir nor on the hub
        print(f"error: {_os_error_message(exc)}", file=sys.stderr)
    return 2


def _os_error_message(exc: OSError) -> str:
    """``No such file or directory: x.jsonl`` rather than ``[Errno 2] ...``; else the library's own text."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
