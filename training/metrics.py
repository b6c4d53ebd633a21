"""Training metrics: summed over micro-batches and processes, written to ``metrics.jsonl`` (and trackers)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from medusa_lora.training.losses import LossParts

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Accumulates micro-batch losses and head hits; ``flush`` reduces them across processes and writes."""

    def __init__(
        self, accelerator: Accelerator, output_dir: Path, num_heads: int, with_lm: bool, step: int
    ) -> None:
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        self.num_heads = num_heads
        self.with_lm = with_lm
        self.start = time.perf_counter()
        self.sums = torch.zeros(3 + 3 * num_heads, device=accelerator.device)
        if accelerator.is_main_process:
            _truncate_after(self.path, step)

    def add(self, loss: torch.Tensor, parts: LossParts) -> None:
        k = self.num_heads
        self.sums[0] += 1
        self.sums[1] += loss.detach().float()
        self.sums[2] += parts.lm_loss.detach().float()
        if parts.head_losses.numel():
            self.sums[3 : 3 + k] += parts.head_losses.detach().float()
            self.sums[3 + k : 3 + 2 * k] += parts.head_correct
            self.sums[3 + 2 * k :] += parts.head_count

    def flush(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Mean loss per micro-batch and top-1 accuracy per head since the last flush (all processes call)."""
        sums = self.accelerator.reduce(self.sums, reduction="sum").cpu()
        self.sums.zero_()
        k, n = self.num_heads, max(float(sums[0]), 1.0)
        record: dict[str, Any] = {"step": step, **extra, "loss": float(sums[1]) / n}
        if self.with_lm:
            record["lm_loss"] = float(sums[2]) / n
        if k and float(sums[3 + 2 * k :].sum()) > 0:
            record["head_loss"] = [float(x) / n for x in sums[3 : 3 + k]]
            record["head_acc"] = (sums[3 + k : 3 + 2 * k] / sums[3 + 2 * k :].clamp(min=1)).tolist()
        record["elapsed_s"] = time.perf_counter() - self.start
        self.write(record)
        self.accelerator.log(_scalars(record), step=step)
        return record

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def summary(record: dict[str, Any]) -> str:
    """A short progress-bar postfix: loss, per-head loss and per-head top-1 accuracy."""
    text = f"loss {record['loss']:.3f}"
    if "head_loss" in record:
        text += " | heads " + "/".join(f"{x:.2f}" for x in record["head_loss"])
        text += " | acc " + "/".join(f"{x:.2f}" for x in record["head_acc"])
    return text


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, list):
            flat.update({f"{key}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and key != "step":
            flat[key] = value
    return flat


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if kept != lines:
        path.write_text("".join(kept))
