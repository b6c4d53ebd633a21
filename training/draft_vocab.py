"""The heads' draft vocabulary: the most frequent label tokens of the training data."""

from __future__ import annotations

import datasets
import torch

from medusa_lora.model.heads import IGNORE_INDEX


def frequent_label_tokens(dataset: datasets.Dataset, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids among ``dataset``'s labels (fewer if fewer occur), by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for labels in dataset["labels"]:
        tokens = torch.tensor(labels, dtype=torch.long)
        counts += torch.bincount(tokens[tokens != IGNORE_INDEX], minlength=vocab_size)
    present = int((counts > 0).sum())
    top = counts.topk(min(size, present)).indices
    return top.sort().values
