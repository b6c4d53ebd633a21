"""Medusa heads: K small residual MLPs on the last hidden state, each predicting one token further ahead."""

from __future__ import annotations

import torch
from torch import nn

from medusa_lora.config import MedusaConfig


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)``, initialised to the identity (W = 0, b = 0)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; head k (0-based) predicts the token k + 2 positions after the input position.

    By default every head feeds the base model's (frozen) LM head, so all K heads cost one matmul
    against the vocabulary. With ``separate_lm_head`` each head owns a copy of the LM head, the
    layout of the original Medusa.
    """

    def __init__(self, config: MedusaConfig, lm_head_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(config.num_layers)]) for _ in range(config.num_heads)
        )
        self.lm_heads: nn.ModuleList | None = None
        if config.separate_lm_head:
            self.lm_heads = nn.ModuleList(
                nn.Linear(hidden, config.vocab_size, bias=False) for _ in range(config.num_heads)
            )
            if lm_head_weight is not None:
                for head in self.lm_heads:
                    head.weight.data.copy_(lm_head_weight)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (K, ..., H): each head's transformed hidden state."""
        return torch.stack([block(hidden_states) for block in self.blocks])

    def forward(self, hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """(..., H) -> (K, ..., V) head logits; ``lm_head`` is the base model's output layer."""
        head_hidden = self.hidden(hidden_states)
        if self.lm_heads is None:
            return lm_head(head_hidden)
        return torch.stack([head(h) for head, h in zip(self.lm_heads, head_hidden)])
