"""Medusa heads: K small residual MLPs on the last hidden state, each predicting one token further ahead."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medusa_lora.config import MedusaConfig

IGNORE_INDEX = -100


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``, initialised to the identity (W = 0, b = 0)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; head k (0-based) predicts the token k + 2 positions after the input position.

    By default every head feeds the base model's (frozen) LM head, so all K heads cost one matmul
    against the vocabulary. With ``separate_lm_head`` each head owns a copy of the LM head, the
    layout of the original Medusa.

    With ``config.root_conditioned`` each head also sees the token that follows its input position (when the
    heads draft, that is the root: the base model's own next token, already chosen), through a learned
    projection of its input embedding added to the hidden state (``root_proj``, zero at the start, so training
    begins from plain Medusa heads). This is the first step of Hydra's sequentially dependent heads, which see
    every earlier draft token; seeing only the root keeps one candidate list per head, so the tree stays static.

    With a draft vocabulary (``config.draft_vocab_size > 0``) the heads only score those tokens (the
    ``draft_vocab`` buffer holds their ids): a task's frequent tokens make the heads' LM-head matmul many
    times cheaper, in training and at every generation step. Drafting stays lossless: the base model
    verifies every candidate over its full vocabulary.
    """

    draft_vocab: torch.Tensor | None

    def __init__(self, config: MedusaConfig, lm_head_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(config.num_layers)])
            for _ in range(config.num_heads)
        )
        self.lm_heads: nn.ModuleList | None = None
        if config.separate_lm_head:
            self.lm_heads = nn.ModuleList(
                nn.Linear(hidden, config.vocab_size, bias=False) for _ in range(config.num_heads)
            )
            if lm_head_weight is not None:
                for head in self.lm_heads:
                    head.weight.data.copy_(lm_head_weight)
        self.root_proj: nn.Linear | None = None
        if config.root_conditioned:
            self.root_proj = nn.Linear(hidden, config.num_heads * hidden, bias=False)
            nn.init.zeros_(self.root_proj.weight)
        draft = torch.arange(config.draft_vocab_size) if config.draft_vocab_size else None
        self.register_buffer("draft_vocab", draft)  # a None buffer is left out of the state dict

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def vocab_size(self) -> int:
        """How many tokens a head scores: the draft vocabulary, else the full one."""
        return self.config.draft_vocab_size or self.config.vocab_size

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Restrict the heads to ``token_ids`` (distinct ids); updates ``config.draft_vocab_size``."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if token_ids.unique().numel() != token_ids.numel():
            raise ValueError("draft vocabulary ids must be distinct")
        self.config.draft_vocab_size = token_ids.numel()
        self.draft_vocab = token_ids.to(next(self.parameters(), token_ids).device)

    def hidden(self, hidden_states: torch.Tensor, root_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> (K, ..., H): each head's transformed hidden state. ``root_embeds`` (..., H): the input
        embeddings of the tokens after ``hidden_states``' positions; root-conditioned heads need them."""
        if self.root_proj is None:
            return torch.stack([block(hidden_states) for block in self.blocks])
        if root_embeds is None:
            raise ValueError("root-conditioned heads need root_embeds: the embeddings of the next tokens")
        shifts = self.root_proj(root_embeds).unflatten(-1, (self.num_heads, -1)).movedim(-2, 0)  # (K, ..., H)
        return torch.stack([block(hidden_states + shift) for block, shift in zip(self.blocks, shifts)])

    def project(self, head: int, head_hidden: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        """Head ``head``'s logits (..., vocab_size) from its transformed hidden state (..., H)."""
        return F.linear(
            head_hidden, *self._output_layer(lm_head if self.lm_heads is None else self.lm_heads[head])
        )

    def forward(
        self, hidden_states: torch.Tensor, lm_head: nn.Linear, root_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(..., H) -> (K, ..., vocab_size) head logits; ``lm_head`` is the base model's output layer,
        ``root_embeds`` as in ``hidden``."""
        head_hidden = self.hidden(hidden_states, root_embeds)
        if self.lm_heads is None:
            return F.linear(head_hidden, *self._output_layer(lm_head))  # one matmul for all heads
        return torch.stack([self.project(k, h, lm_head) for k, h in enumerate(head_hidden)])

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Map indices into the heads' logits to token ids."""
        return indices if self.draft_vocab is None else self.draft_vocab[indices]

    def target_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map target token ids to indices into the heads' logits (``IGNORE_INDEX`` outside the draft vocab)."""
        if self.draft_vocab is None:
            return token_ids
        lookup = torch.full(
            (self.config.vocab_size,), IGNORE_INDEX, dtype=torch.long, device=token_ids.device
        )
        lookup[self.draft_vocab] = torch.arange(self.draft_vocab.numel(), device=token_ids.device)
        return torch.where(token_ids >= 0, lookup[token_ids.clamp(min=0)], token_ids)

    def _output_layer(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = layer.weight, layer.bias
        if self.draft_vocab is None:
            return weight, bias
        return weight[self.draft_vocab], None if bias is None else bias[self.draft_vocab]
