"""Heads replay: after the last optimizer step the heads train alone over the inputs training gave them.

Each step's decoder forward already computed the last hidden states the heads read; ``ReplayCache`` keeps them
(with the roots, the path tokens and the targets) for the last ``heads_replay_steps`` steps, and
``replay_heads`` runs ``heads_replay_epochs`` passes of head-only steps over them. A head step costs a small
fraction of a decoder step, so the heads get many more updates than the joint steps give them, without a
decoder forward (docs/benchmarks.md: "Heads replay"). The hidden states of earlier steps come from a LoRA a
few steps older than the final one; late in a cosine schedule it barely moves.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from medusa_lora.model.heads import IGNORE_INDEX
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.config import TrainConfig
from medusa_lora.training.losses import HeadInputs, LossParts, mean_ce, total_loss

_FIELDS = tuple(f.name for f in dataclasses.fields(HeadInputs))
REPLAY_WARMUP = 0.05  # of the replay's steps


class ReplayCache:
    """The heads' inputs of the last ``window`` optimizer steps (all steps when ``window`` is 0), this process's
    share; ``state_dict``/``load_state_dict`` carry it through checkpoints (tensors only: safetensors)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.entries: list[tuple[int, HeadInputs]] = []

    def add(self, step: int, inputs: HeadInputs) -> None:
        """Keep ``inputs`` computed at optimizer step ``step`` (0-based); drop what fell out of the window."""
        self.entries.append((step, inputs))
        if self.window:
            self.entries = [(s, x) for s, x in self.entries if s > step - self.window]

    def __len__(self) -> int:
        return sum(x.targets.shape[0] for _, x in self.entries)

    def joined(self) -> tuple[HeadInputs, torch.Tensor] | None:
        """Every kept position in the order they were added, and the optimizer step of each; None when empty."""
        if not self.entries:
            return None
        inputs = HeadInputs.cat([x for _, x in self.entries])
        steps = torch.cat(
            [torch.full((len(x.targets),), s, device=x.targets.device) for s, x in self.entries]
        )
        return inputs, steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for i, (step, inputs) in enumerate(self.entries):
            tensors[f"{i}.step"] = torch.tensor(step)
            for name in _FIELDS:
                value = getattr(inputs, name)
                if value is not None:
                    tensors[f"{i}.{name}"] = value.detach().cpu().contiguous()
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        count = len({key.split(".", 1)[0] for key in tensors})
        self.entries = []
        for i in range(count):
            inputs = HeadInputs(**{name: tensors.get(f"{i}.{name}") for name in _FIELDS})
            self.entries.append((int(tensors[f"{i}.step"]), inputs.map(lambda x: x.to(device))))


def gather(accelerator: Accelerator, inputs: HeadInputs, steps: torch.Tensor) -> HeadInputs:
    """Every process's cached positions on every process (each then replays the same), ordered by step and,
    within a step, by process: the order one process accumulating the same micro-batches would have."""
    if accelerator.num_processes == 1:
        return inputs
    counts = accelerator.gather(torch.tensor([len(steps)], device=steps.device)).tolist()

    def everyones(x: torch.Tensor) -> torch.Tensor:
        padded = accelerator.pad_across_processes(x, dim=0)
        everyone = accelerator.gather(padded)
        return torch.cat([everyone[i * padded.shape[0] :][:n] for i, n in enumerate(counts)])

    order = torch.sort(everyones(steps), stable=True).indices
    return inputs.map(lambda x: everyones(x)[order])


def replay_loss(
    model: MedusaLoraModel, inputs: HeadInputs, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The heads' loss on ``inputs`` (teacher forced, as in training), training's formula with the heads'
    weight 1: sum_k head_loss_decay**k * mean CE_k over head k's labelled positions; also each head's top-1
    hits and labelled count. Hidden states cached under bf16 autocast are read in the model's dtype."""
    hidden = inputs.hidden.to(model.dtype)
    logits = model.draft_logits(hidden, inputs.next_ids, inputs.path_ids)  # (K, N, V')
    losses, hits, counts = [], [], []
    for head_logits, targets in zip(logits, inputs.targets.T):
        labelled = targets != IGNORE_INDEX
        losses.append(mean_ce(head_logits[labelled], targets[labelled]))
        hits.append((head_logits.argmax(-1)[labelled] == targets[labelled]).sum())
        counts.append(labelled.sum())
    zero = logits.new_zeros(())
    parts = LossParts(zero, torch.stack(losses), torch.stack(hits), torch.stack(counts))
    return total_loss(parts, 1.0, cfg), parts.head_correct, parts.head_count


def replay_heads(
    model: MedusaLoraModel,
    inputs: HeadInputs,
    cfg: TrainConfig,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    show_progress: bool = True,
    run: Callable[..., Any] = lambda fn, *args: fn(*args),
) -> list[dict]:
    """``cfg.heads_replay_epochs`` passes of head-only AdamW steps over ``inputs`` (shuffled by ``cfg.seed``,
    a cosine schedule peaking at ``lr_heads_replay``), under ``autocast`` as training ran; returns one record
    per pass (loss, top-1 per head). Each step's loss is ``run(replay_loss, model, inputs, cfg)``: under FSDP
    a forward of the sharded objective (``MedusaObjective.run``)."""
    params = [p for p in model.heads.parameters() if p.requires_grad]
    batch = cfg.heads_replay_batch_size
    positions = inputs.targets.shape[0]
    batches_per_epoch = math.ceil(positions / batch)
    total = max(1, round(cfg.heads_replay_epochs * batches_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr_heads_replay, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(REPLAY_WARMUP * total), total)
    generator = torch.Generator().manual_seed(cfg.seed)
    was_training = model.heads.training
    model.heads.train()
    records, step = [], 0
    progress = tqdm(total=total, desc="heads replay", disable=not show_progress)
    while step < total:
        order = torch.randperm(positions, generator=generator).to(inputs.targets.device)
        loss_sum, hits, counts, batches = 0.0, 0, 0, 0
        for start in range(0, positions, batch):
            rows = order[start : start + batch]
            part = inputs.map(lambda x, rows=rows: x[rows])
            with autocast():
                loss, batch_hits, batch_counts = run(replay_loss, model, part, cfg)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            loss_sum += loss.item()
            hits, counts, batches = hits + batch_hits, counts + batch_counts, batches + 1
            step += 1
            progress.update(1)
            if step == total:
                break
        top1 = (hits / counts.clamp(min=1)).tolist()
        records.append(
            {"split": "replay", "epoch": len(records) + 1, "loss": loss_sum / batches, "head_top1": top1}
        )
        progress.set_postfix_str(f"loss {loss_sum / batches:.3f}")
    progress.close()
    model.heads.train(was_training)
    return records
