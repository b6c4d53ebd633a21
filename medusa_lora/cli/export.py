"""``medusa-lora export`` / ``medusa-lora import``: heads to and from the layouts serving engines load
(vLLM's Medusa draft model, TGI, LoRAX)."""

from __future__ import annotations

import argparse
import sys


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medusa-lora export",
        description="write heads for serving: vLLM's Medusa draft model, TGI or LoRAX",
    )
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
    from medusa_lora.formats.export import export_heads
    from medusa_lora.model.wrapper import MedusaLoraModel

    model = MedusaLoraModel.from_pretrained(args.model, args.adapter)
    print(export_heads(model, args.out, args.format, args.merged_base, overwrite=args.overwrite))
    if args.format == "vllm" and model.config.draft_vocab_size:
        print(VLLM_TOKEN_MAP_NOTE, file=sys.stderr)
    return 0


# vLLM 0.32's MedusaModel.load_weights loads token_map but never reports it loaded (docs/vllm.md)
VLLM_TOKEN_MAP_NOTE = (
    "note: these heads draft from a vocabulary subset (vLLM's token_map); vLLM 0.32 loads it only with "
    'LLM(..., model_loader_extra_config={"enable_weights_track": False}) '
    """(vllm serve: --model-loader-extra-config '{"enable_weights_track": false}')"""
)


def import_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="medusa-lora import",
        description="bring vLLM/TGI/LoRAX Medusa heads in as a heads-only medusa-lora model",
    )
    parser.add_argument("directory", help="a vLLM Medusa draft model or a TGI/LoRAX Medusa dir")
    parser.add_argument("--out", required=True, help="the heads-only medusa-lora model dir to write")
    parser.add_argument(
        "--model", help="base model (default: the export's base_model_name_or_path; vLLM exports need it)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    from medusa_lora.formats.import_heads import import_heads

    print(import_heads(args.directory, args.out, args.model, overwrite=args.overwrite))
    return 0
