"""Calibration: each head's top-k hit rates against what greedy verification accepts, the best tree, and the
ranks that let any tree's tokens per step be walked (``tree.walked_accepted_length``)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from medusa_lora.atomic import atomic_write_text
from medusa_lora.model.heads import IGNORE_INDEX
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.losses import predict, shift_left
from medusa_lora.trees.tree import calibrated_tree
from medusa_lora.trees.walk import walked_accepted_length

CALIBRATION_FILE = "calibration.json"
TOP_K = 10  # ranks 0-9: one digit each in ``greedy_ranks``
GREEDY_TARGETS = "greedy"  # what ``Calibration.hit_rates`` are measured against


@dataclass
class Calibration:
    """``hit_rates[k][r]``: how often head k's rank-r candidate is the model's own greedy token there, given
    that heads 0..k-1 drafted the tokens before it right at rank 0 (what a tree's node probabilities
    multiply: ``tree.expected_accepted_length``); ``head_top1[k]``: head k's top-1 rate at all positions.

    ``greedy_ranks``: per held-out completion, one word per token, the ranks of the greedy tokens after it
    among heads 0, 1, ...'s candidates up to the first miss (``MedusaConfig.greedy_ranks``);
    ``expected_accepted_length``: the tree's tokens per step, generation walked over them.

    ``targets`` names what the hit rates were measured against (``"greedy"``); ``lm_top1`` is how often
    the model's greedy token is the held-out completion's token.
    """

    samples: int
    tokens: list[int]  # per head: positions its hit rates count (those where heads 0..k-1 were right)
    hit_rates: list[list[float]]
    head_top1: list[float]
    lm_top1: float
    tree_size: int
    tree: list[list[int]]
    expected_accepted_length: float
    greedy_ranks: list[str]
    targets: str = GREEDY_TARGETS

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")


@torch.inference_mode()
def calibrate(
    model: MedusaLoraModel,
    dataset: datasets.Dataset,
    collator: DataCollatorForSeq2Seq,
    batch_size: int,
    tree_size: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> Calibration:
    """Measure on ``dataset`` (tokenized, with labels) and build the ``tree_size``-node calibrated tree.

    Greedy verification accepts head k's candidate at position t (the token at t + k + 2) when it equals
    the base model's argmax at position t + k + 1, so that argmax is the target. It is taken teacher-forced
    on the held-out completion (the prefix is the data's tokens, not the model's own earlier greedy
    tokens): the standard approximation, exact wherever the model's greedy output follows the data.
    Heads are measured only at positions generation drafts from (whose next token is a completion token).
    Root-conditioned heads see the data's token t + 1, consistent with the teacher-forced argmax targets.
    The same ranks, per position, are kept as ``greedy_ranks`` for the step walk.
    """
    was_training = model.training
    model.eval()
    num_heads = model.heads.num_heads
    hits = torch.zeros(num_heads, TOP_K)
    counts = torch.zeros(num_heads)
    top1, everywhere = torch.zeros(num_heads), torch.zeros(num_heads)
    lm_hits = lm_count = 0
    greedy_ranks: list[str] = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        with autocast():
            preds = predict(
                model,
                **{k: v.to(model.device) for k, v in batch.items()},
                with_lm=True,
                with_heads=True,
                as_in_generation=True,
            )
        greedy = preds.lm_logits.argmax(-1)  # the model's token after each labelled position
        lm_hits += int((greedy == preds.lm_targets).sum())
        lm_count += preds.lm_targets.numel()
        right_so_far = None  # per flat position: heads 0..k-1 all drafted the accepted token at rank 0
        position_ranks = torch.full((batch["labels"].numel(), num_heads), TOP_K, device=greedy.device)
        for k, (logits, rows) in enumerate(zip(preds.head_logits, preds.teacher_rows)):
            targets = model.heads.target_indices(greedy[rows])  # argmax at t + k + 1
            known = targets != IGNORE_INDEX  # tokens outside a draft vocabulary are misses
            ranks = torch.full_like(targets, TOP_K)
            ranks[known] = (logits[known] > logits[known].gather(-1, targets[known, None])).sum(-1)
            positions = preds.head_positions[k]
            position_ranks[positions, k] = ranks
            given = torch.ones_like(known) if right_so_far is None else right_so_far[positions]
            hits[k] += torch.bincount(ranks[given & (ranks < TOP_K)], minlength=TOP_K).cpu().float()
            counts[k] += int(given.sum())
            top1[k] += int((ranks == 0).sum())
            everywhere[k] += targets.numel()
            right_so_far = torch.zeros(batch["labels"].numel(), dtype=torch.bool, device=ranks.device)
            right_so_far[positions] = given & (ranks == 0)
        greedy_ranks += _rank_words(position_ranks, batch["labels"])
    model.train(was_training)
    hit_rates = (hits / counts.clamp(min=1)[:, None]).tolist()
    tree = calibrated_tree(hit_rates, tree_size)
    return Calibration(
        samples=len(dataset),
        tokens=[int(c) for c in counts],
        hit_rates=hit_rates,
        head_top1=(top1 / everywhere.clamp(min=1)).tolist(),
        lm_top1=lm_hits / max(lm_count, 1),
        tree_size=tree.size,
        tree=tree.to_list(),
        expected_accepted_length=walked_accepted_length(tree, greedy_ranks),
        greedy_ranks=greedy_ranks,
    )


def _rank_words(position_ranks: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Per row of ``labels`` (B, L), the words of ``greedy_ranks`` from ``position_ranks`` (B * L, K): one per
    position whose next token is a completion token (the root of a step drafting from it), the ranks' digits
    up to the first miss (``TOP_K``)."""
    roots = shift_left(labels, 1, IGNORE_INDEX) != IGNORE_INDEX
    ranks = position_ranks.view(*labels.shape, -1).tolist()
    words = []
    for row, is_root in zip(ranks, roots.tolist()):
        words.append(
            " ".join(
                "".join(str(r) for r in itertools.takewhile(lambda r: r < TOP_K, rank))
                for rank, root in zip(row, is_root)
                if root
            )
        )
    return words
