"""The seam where tree attention plugs into a transformers model.

The torch path hands the model a 4D additive mask (prefix fully visible, tree ancestors only) and lets
SDPA do the work. The Triton path registers an attention function named ``medusa_tree`` through
``AttentionInterface``; the model passes the tree's packed ancestor bitmask to it as a keyword
argument, and calls without that argument (the prefill) fall through to SDPA.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from medusa_lora.kernels import kernel_backend, pack_tree_mask, tree_attention
from medusa_lora.tree import TokenTree

TREE_ATTENTION = "medusa_tree"


def medusa_tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    tree_bits: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: tree attention when ``tree_bits`` is given, else SDPA."""
    if tree_bits is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = tree_attention(query, key, value, tree_bits, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, medusa_tree_attention)
AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)


def tree_attention_kwargs(
    model: PreTrainedModel, tree: TokenTree, prefix_len: int
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the decoder's forward over ``tree`` after ``prefix_len`` cached tokens."""
    device, dtype = model.device, model.dtype
    if kernel_backend(device) == "triton":
        if model.config._attn_implementation != TREE_ATTENTION:
            model.set_attn_implementation(TREE_ATTENTION)
        return {"tree_bits": _packed_mask(tree, device)}
    additive = torch.zeros(1, 1, tree.size, prefix_len + tree.size, dtype=dtype, device=device)
    additive[..., prefix_len:].masked_fill_(~tree.tensors(device).mask, torch.finfo(dtype).min)
    return {"attention_mask": additive}


@lru_cache(maxsize=64)
def _packed_mask(tree: TokenTree, device: torch.device) -> torch.Tensor:
    return pack_tree_mask(tree.tensors(device).mask)
