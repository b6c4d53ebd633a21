"""The training objective: LM cross-entropy plus decayed Medusa head losses, only at labelled positions.

The LM head (vocabulary matmul) runs only at positions whose target is labelled: position t for the
LM when token t+1 is labelled, and for head k (0-based) when token t+k+2 is. Prompt positions never
reach the vocabulary, which is most of the cost on CPU with a 49k vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.config import TrainConfig
from medusa_lora.training.data import IGNORE_INDEX

T = TypeVar("T")


def shift_left(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """(B, T): ``out[:, t] = x[:, t + n]``; the last ``n`` positions get ``fill``."""
    out = torch.full_like(x, fill)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


@dataclass
class HeadInputs:
    """What the heads read at positions where any head has a target, and those targets: what the heads train
    on, kept for replay (``replay.py``)."""

    hidden: torch.Tensor  # (N, H) last hidden states
    next_ids: torch.Tensor  # (N,) the token after each position (the root)
    path_ids: torch.Tensor | None  # (N, K - 1) the data's tokens after the root (path-conditioned heads)
    targets: torch.Tensor  # (N, K) head k's target, an index into the heads' vocabulary, or IGNORE_INDEX

    def detach(self) -> HeadInputs:
        return HeadInputs(self.hidden.detach(), self.next_ids, self.path_ids, self.targets)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> HeadInputs:
        """``fn`` applied to each tensor (``path_ids`` stays None): rows picked, moved, gathered."""
        return HeadInputs(*(None if x is None else fn(x) for x in vars(self).values()))

    @staticmethod
    def cat(parts: Sequence[HeadInputs]) -> HeadInputs:
        """The rows of ``parts``, in order."""
        columns = zip(*(vars(part).values() for part in parts))
        return HeadInputs(*(None if xs[0] is None else torch.cat(xs) for xs in columns))


@dataclass
class Predictions:
    """Logits and targets at labelled positions, row-major over (batch, position)."""

    lm_logits: torch.Tensor | None  # (N, V): positions whose next token is labelled
    lm_targets: torch.Tensor | None  # (N,)
    head_logits: list[torch.Tensor]  # head k: (N_k, V'): positions whose token k+2 ahead is labelled
    head_targets: list[torch.Tensor]  # head k: (N_k,) indices into the heads' vocabulary V' (draft or full);
    # IGNORE_INDEX where the token is outside a draft vocabulary (never a hit, not trained on)
    teacher_rows: list[torch.Tensor]  # head k: the rows of lm_logits that predict the same tokens
    head_positions: list[torch.Tensor]  # head k: each row's position, flat over (batch, position)
    head_inputs: HeadInputs | None = None  # teacher forcing only


def predict(
    model: MedusaLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    with_lm: bool,
    with_heads: bool,
    as_in_generation: bool = False,
    with_inputs: bool = False,
) -> Predictions:
    """One decoder forward; LM and head logits only where their targets are labelled; with ``with_inputs`` (and
    teacher forcing) also what the heads read there, ``head_inputs``.

    Conditioned heads at position t see token t + 1 of the data (teacher forcing, as the targets are), and
    path-conditioned heads the data's tokens after it. With ``as_in_generation`` the heads run only where
    generation drafts: at positions whose next token is a completion token (the root; at the prompt's
    second-to-last token head 0 would predict the root itself), and path-conditioned heads read their own
    top-1 drafts after the root, as generation has them.
    """
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask, use_cache=False)
    lm_targets = shift_left(labels, 1, IGNORE_INDEX)
    lm_mask = lm_targets != IGNORE_INDEX
    lm_logits = model.lm_head(hidden[lm_mask]) if with_lm else None
    head_logits, head_targets, teacher_rows, head_positions = [], [], [], []
    head_inputs = None
    if with_heads:
        targets = torch.stack([shift_left(labels, k + 2, IGNORE_INDEX) for k in range(model.heads.num_heads)])
        masks = targets != IGNORE_INDEX
        head_indices = model.heads.target_indices(targets)  # IGNORE_INDEX also outside a draft vocabulary
        if as_in_generation:
            masks &= lm_mask
        any_head = masks.any(0)
        next_ids = shift_left(input_ids, 1, 0)[any_head]
        path_ids = None  # as in generation: path-conditioned heads read their own drafts
        if model.heads.conditioning_tokens > 1 and not as_in_generation:  # teacher forcing: the data's tokens
            path_ids = torch.stack(
                [shift_left(input_ids, j, 0) for j in range(2, model.heads.num_heads + 1)], dim=-1
            )[any_head]
        any_hidden = hidden[any_head]
        all_logits = model.draft_logits(any_hidden, next_ids, path_ids)  # (K, N_any, V')
        if with_inputs and not as_in_generation:
            head_inputs = HeadInputs(any_hidden, next_ids, path_ids, head_indices[:, any_head].T)
        lm_row = torch.full_like(labels, -1)
        lm_row[lm_mask] = torch.arange(int(lm_mask.sum()), device=labels.device)
        for k in range(model.heads.num_heads):
            head_logits.append(all_logits[k][masks[k][any_head]])
            head_targets.append(head_indices[k][masks[k]])
            teacher_rows.append(shift_left(lm_row, k + 1, -1)[masks[k]])
            head_positions.append(masks[k].flatten().nonzero().flatten())
    return Predictions(
        lm_logits,
        lm_targets[lm_mask] if with_lm else None,
        head_logits,
        head_targets,
        teacher_rows,
        head_positions,
        head_inputs,
    )


@dataclass
class LossParts:
    """One micro-batch's losses (means over its labelled tokens) and top-1 hit counts."""

    lm_loss: torch.Tensor  # scalar; 0 when the LM is not trained
    head_losses: torch.Tensor  # (K,); empty when the heads are not trained
    head_correct: torch.Tensor  # (K,) top-1 hits against the data's tokens
    head_count: torch.Tensor  # (K,)
    head_inputs: HeadInputs | None = None  # detached, when the objective keeps them for replay


class MedusaObjective(nn.Module):
    """Wraps the model so that one ``forward`` is one loss computation (what DDP needs to sync gradients)."""

    def __init__(self, model: MedusaLoraModel, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.train_lm = cfg.trains_lora
        self.train_heads = cfg.trains_heads
        self.distill = cfg.head_targets == "distill"
        self.keep_head_inputs = cfg.heads_replay_epochs > 0

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> LossParts:
        preds = predict(
            self.model,
            input_ids,
            attention_mask,
            labels,
            with_lm=self.train_lm or (self.train_heads and self.distill),
            with_heads=self.train_heads,
            with_inputs=self.keep_head_inputs,
        )
        zero = torch.zeros((), device=input_ids.device)
        lm_loss = mean_ce(preds.lm_logits, preds.lm_targets) if self.train_lm else zero
        losses, correct, count = [], [], []
        for k, (logits, targets) in enumerate(zip(preds.head_logits, preds.head_targets)):
            if self.distill:
                teacher = preds.lm_logits[preds.teacher_rows[k]].detach()
                if self.model.heads.draft_vocab is not None:
                    teacher = teacher[
                        :, self.model.heads.draft_vocab
                    ]  # the teacher renormalised on the draft vocab
                losses.append(_mean_kl(teacher, logits))
            else:
                losses.append(mean_ce(logits, targets))
            correct.append((logits.argmax(-1) == targets).sum().float())
            count.append(zero + targets.numel())
        kept = preds.head_inputs.detach() if self.keep_head_inputs else None
        return LossParts(lm_loss, _stack(losses, zero), _stack(correct, zero), _stack(count, zero), kept)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, for work on the model outside the training loss (calibration, a heads replay
        step); sharded (``sharding.shard``), a forward of this module, so that FSDP gathers the parameters."""
        return fn(*args, **kwargs)


def _stack(values: list[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    return torch.stack(values) if values else zero.new_zeros(0)


def mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)


def _mean_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, averaged."""
    teacher = F.log_softmax(teacher_logits.float(), -1)
    student = F.log_softmax(student_logits.float(), -1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / max(student.shape[0], 1)


def head_weight(step: int, cfg: TrainConfig) -> float:
    """The heads' loss weight at optimizer step ``step`` (0-based).

    Joint mode: ramps linearly from 0 at step 0 to ``head_loss_weight`` at ``heads_warmup_steps``.
    Heads mode: 1 (the head loss is the whole loss). LoRA mode: 0.
    """
    if cfg.mode == "heads":
        return 1.0
    if cfg.mode == "lora":
        return 0.0
    if cfg.heads_warmup_steps == 0:
        return cfg.head_loss_weight
    return cfg.head_loss_weight * min(1.0, step / cfg.heads_warmup_steps)


def total_loss(parts: LossParts, weight: float, cfg: TrainConfig) -> torch.Tensor:
    """LM loss + weight * sum_k decay**k * head_loss_k (each term only when trained)."""
    loss = parts.lm_loss
    if parts.head_losses.numel():
        decay = cfg.head_loss_decay ** torch.arange(len(parts.head_losses), device=parts.head_losses.device)
        loss = loss + weight * (decay * parts.head_losses).sum()
    return loss
