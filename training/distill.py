"""Self-distillation data: the model answers prompts itself; the answers become training completions.

Heads trained on the model's own outputs predict what it will actually generate (Medusa's recipe for
models whose training data is not available). ``medusa-lora distill --prompts prompts.jsonl --out ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medusa_lora.atomic import atomic_write_text
from medusa_lora.errors import ConfigError, MedusaLoraError
from medusa_lora.model.base import load_base_model, load_tokenizer
from medusa_lora.prompting import PromptFormat
from medusa_lora.training.data import read_records

logger = logging.getLogger(__name__)


def read_prompts(source: str) -> list[dict[str, str]]:
    """A data file with a ``prompt`` field (``id`` is kept), e.g. from ``medusa-lora make-generic-prompts``."""
    records = read_records(source)
    if "prompt" not in records.column_names:
        raise ConfigError(f"{source}: missing field 'prompt'; found fields {records.column_names}")
    keep = [c for c in ("prompt", "id") if c in records.column_names]
    rows = records.select_columns(keep).to_list()
    for index, row in enumerate(rows):
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ConfigError(
                f"{source}: field 'prompt' of record {index} is not non-empty text: {row['prompt']!r}"
            )
    return rows


@torch.inference_mode()
def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 8,
    use_chat_template: bool = True,
) -> list[tuple[str, bool]]:
    """(completion, finished) per prompt: batched ``generate`` with left padding, prompts sorted by length."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt_format = PromptFormat(tokenizer, use_chat_template)
    stop = set(prompt_format.stop_ids([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    texts = [prompt_format.text(p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[tuple[str, bool]] = [("", False)] * len(texts)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    for start in tqdm(range(0, len(order), batch_size), desc="distilling", unit="batch"):
        chunk = order[start : start + batch_size]
        inputs = tokenizer(
            [texts[i] for i in chunk], add_special_tokens=False, padding=True, return_tensors="pt"
        )
        outputs = model.generate(
            **inputs.to(model.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(stop),
            **sampling,
        )
        for index, row in zip(chunk, outputs[:, inputs.input_ids.shape[1] :].tolist()):
            finished = any(token in stop for token in row)
            results[index] = (tokenizer.decode(row, skip_special_tokens=True), finished)
    return results


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write ``records`` as jsonl, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-lora distill",
        description="Answer prompts with the model itself; write prompt/completion jsonl for head training.",
    )
    parser.add_argument("--model", default="smollm2-135m", help="hub id, local dir or smollm2-135m")
    parser.add_argument(
        "--prompts", required=True, help="a jsonl/json/parquet/csv file with a 'prompt' field"
    )
    parser.add_argument("--out", required=True, type=Path, help="output jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--batch-size", type=int, default=8)

    parser.add_argument("--seed", type=int, default=0, help="for sampling")
    parser.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="feed the raw prompt text instead of the chat template's user turn",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Distill: read prompts, answer them, write ``--out``; 2 on an input error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.max_new_tokens < 1 or args.batch_size < 1 or args.temperature < 0:
            raise ConfigError("--max-new-tokens and --batch-size must be >= 1 and --temperature >= 0")
        rows = read_prompts(args.prompts)
        torch.manual_seed(args.seed)
        model, tokenizer = load_base_model(args.model), load_tokenizer(args.model)
        answers = complete(
            model,
            tokenizer,
            [r["prompt"] for r in rows],
            args.max_new_tokens,
            args.temperature,
            args.batch_size,
            args.chat_template,
        )
    except MedusaLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_jsonl(args.out, [{**row, "completion": text} for row, (text, _) in zip(rows, answers)])
    cut = sum(not finished for _, finished in answers)
    if cut:
        logger.warning("%d of %d completions reached --max-new-tokens before ending", cut, len(answers))
    print(f"wrote {len(rows)} prompt/completion records to {args.out}")
    return 0
