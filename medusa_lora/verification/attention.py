"""The seam where tree attention plugs into a transformers model.

Both paths register an attention function named ``medusa_tree`` through ``AttentionInterface``; the model
passes it the tree as a keyword argument, and calls without one (the prefill, plain decoding) fall through to
transformers' SDPA. The torch path passes a 4D additive mask (``tree_mask``: prefix fully visible, tree
ancestors only) to SDPA, which reads grouped KV heads in place; the Triton and CPU-extension paths pass the tree's
packed ancestor bitmask (``tree_bits``) to their kernel. With the CPU kernel, one-token steps run through it too.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from medusa_lora.errors import ConfigError
from medusa_lora.kernels import kernel_backend, pack_tree_mask, tree_attention
from medusa_lora.trees.tree import TokenTree

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
    tree_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: a tree step's attention when ``tree_bits`` (Triton) or ``tree_mask``
    (torch) is given, else SDPA."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if tree_bits is None and _one_token_on_cpu_kernel(query, attention_mask):
        tree_bits = _SELF_ONLY  # a one-token step through the tree kernel: its arithmetic, as in trees
    if tree_bits is not None:
        out = tree_attention(query, key, value, tree_bits, scale)
    elif tree_mask is not None and query.device.type == "cpu":
        # transformers' SDPA copies grouped KV heads to every query head (repeat_kv) when given a mask; the CPU
        # kernel reads them in place, with the same result (on CUDA a mask with GQA falls to the math kernel)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=tree_mask, scale=scale, enable_gqa=True
        )
    else:
        mask = tree_mask if tree_mask is not None else attention_mask
        return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, **kwargs)
    return out.transpose(1, 2).contiguous(), None


_SELF_ONLY = torch.ones(1, 1, dtype=torch.int32)


def _one_token_on_cpu_kernel(query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether a call without a tree is one token seeing every cached one on a CPU with the tree kernel: plain
    decoding then computes as a tree row does, so trees keep its output bit for bit (their rows' arithmetic does
    not depend on the step's size)."""
    if query.shape[2] != 1 or query.shape[0] != 1 or kernel_backend(query.device) != "cpu":
        return False
    if attention_mask is None:
        return True
    return (
        bool(attention_mask.all())
        if attention_mask.dtype == torch.bool
        else bool((attention_mask == 0).all())
    )


AttentionInterface.register(TREE_ATTENTION, medusa_tree_attention)
AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)


def use_tree_attention(model: PreTrainedModel) -> None:
    """Route ``model``'s attention through ``medusa_tree_attention`` (SDPA for calls without a tree)."""
    if model.config._attn_implementation != TREE_ATTENTION:
        model.set_attn_implementation(TREE_ATTENTION)


def tree_attention_kwargs(
    model: PreTrainedModel, tree: TokenTree, prefix_len: int
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the decoder's forward over ``tree`` after ``prefix_len`` cached tokens (the model
    attends through ``use_tree_attention``)."""
    device, dtype = model.device, model.dtype
    if model.config._attn_implementation != TREE_ATTENTION:
        raise ConfigError(
            f"the model attends with {model.config._attn_implementation!r}: tree steps need use_tree_attention()"
        )
    if kernel_backend(device) in ("triton", "cpu"):
        return {"tree_bits": packed_tree_mask(tree, device)}
    additive = torch.zeros(1, 1, tree.size, prefix_len + tree.size, dtype=dtype, device=device)
    additive[..., prefix_len:].masked_fill_(~tree.tensors(device).mask, torch.finfo(dtype).min)
    return {"tree_mask": additive}


@lru_cache(maxsize=64)
def packed_tree_mask(tree: TokenTree, device: torch.device) -> torch.Tensor:
    """The tree's ancestor-or-self mask packed for the kernels (``pack_tree_mask``), cached per tree."""
    return pack_tree_mask(tree.tensors(device).mask)
