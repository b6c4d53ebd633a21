"""``medusa-lora``: one console command; each subcommand is a module with ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

from medusa_lora.errors import MedusaLoraError

# subcommand -> ("module:function" taking argv and returning the exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": (
        "medusa_lora.cli.prepare:main",
        "write the SmolLM2-135M demo model as a Hugging Face dir (offline)",
    ),
    "make-task-data": (
        "medusa_lora.eval.tasks.query_data:main",
        "generate the built-in NL-to-query task dataset",
    ),
    "make-generic-prompts": (
        "medusa_lora.eval.tasks.generic_prompts:main",
        "write general prompts (train/validation/test, prompts only) for generic heads and off-task eval",
    ),
    "make-tool-call-data": (
        "medusa_lora.eval.tasks.tool_calls:main",
        "generate a function-calling task (messages format), to try training and eval on new data",
    ),
    "distill": (
        "medusa_lora.training.distill:main",
        "answer prompts with the model itself (self-distillation data)",
    ),
    "train": ("medusa_lora.cli.train:main", "train a Medusa-LoRA, Medusa heads or a LoRA from a YAML config"),
    "generate": (
        "medusa_lora.cli.generate:main",
        "generate text with speculative decoding and print the stats",
    ),
    "eval": ("medusa_lora.cli.eval:main", "tok/s table: base vs generic Medusa vs task Medusa-LoRA vs peers"),
    "export": (
        "medusa_lora.cli.export:export_main",
        "write heads for serving: vLLM's Medusa draft model, TGI or LoRAX",
    ),
    "import": (
        "medusa_lora.cli.export:import_main",
        "bring vLLM/TGI/LoRAX Medusa heads in as a heads-only medusa-lora model",
    ),
    "serve": (
        "medusa_lora.cli.serve:main",
        "serve adapters with their own heads behind an OpenAI-compatible API",
    ),
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
    module, _, function = SUBCOMMANDS[args.command][0].partition(":")
    try:
        return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
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
