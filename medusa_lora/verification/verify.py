"""Deciding which drafted tree nodes the base model accepts.

``greedy_verify`` and ``sampling_verify`` take the tree's tokens (T,), the base model's logits at every tree node
(T, V) and the tree, and return ``(accepted, next_token)``: the accepted node indices from the root down (always
starting with node 0) and the base model's own token after the last accepted node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusa_lora.trees.tree import TokenTree


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    typical_epsilon: float | None = None  # set (e.g. 0.09) to use Medusa's lossy typical acceptance
    typical_alpha: float = 0.3

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution plain sampling draws from: temperature, then top-p (nucleus) filtering."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def longest_accepted_path(ok: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """Node indices of the longest root-to-leaf prefix whose nodes are all ``ok`` (the root always is)."""
    tensors = tree.tensors(ok.device)
    matched = (ok[tensors.retrieve] & tensors.on_path).long().cumprod(dim=1).sum(dim=1)
    best = int(matched.argmax())
    return tensors.retrieve[best, : int(matched[best])]


def greedy_verify(tokens: torch.Tensor, logits: torch.Tensor, tree: TokenTree) -> tuple[torch.Tensor, int]:
    """Accept the longest root-to-leaf path whose tokens equal the base model's argmax at their parent."""
    tensors = tree.tensors(logits.device)
    predicted = logits.argmax(dim=-1)
    if tree.size == 1:
        return tensors.depths[:1], int(predicted[0])
    correct = torch.ones_like(tokens, dtype=torch.bool)
    correct[1:] = tokens[1:] == predicted[tensors.parents]
    accepted = longest_accepted_path(correct, tree)
    return accepted, int(predicted[accepted[-1]])


def sampling_verify(
    tokens: torch.Tensor,
    logits: torch.Tensor,
    tree: TokenTree,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Lossless multi-candidate speculative sampling (SpecInfer) for deterministic top-k drafts.

    At each accepted node, its children are tried in rank order: child token x is accepted with
    probability p(x) / sum(p), where p is the target distribution with earlier rejected children
    removed. If none is accepted the next token is drawn from what remains of p. The token emitted at
    each position is therefore distributed exactly as plain sampling from p. With ``sampling.typical_epsilon``
    set, Medusa's typical acceptance instead (``_typical_verify``: faster, lossy).
    """
    probs = target_probs(logits, sampling)
    if sampling.typical_epsilon is not None:
        return _typical_verify(tokens, probs, tree, sampling, generator)
    uniforms = torch.rand(
        tree.size, generator=generator, device="cpu" if generator is None else generator.device
    )
    node, accepted = 0, [0]
    while True:
        residual = probs[node].clone()
        chosen = None
        for child in tree.children[node]:
            token = tokens[child]
            total = residual.sum()
            if uniforms[child].item() * total.item() < residual[token].item():
                chosen = child
                break
            residual[token] = 0.0
        if chosen is None:
            next_token = torch.multinomial(residual / residual.sum(), 1, generator=generator)
            return torch.tensor(accepted, device=logits.device), int(next_token)
        accepted.append(chosen)
        node = chosen


def _typical_verify(
    tokens: torch.Tensor,
    probs: torch.Tensor,
    tree: TokenTree,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int]:
    """Medusa's typical acceptance (lossy, opt-in): accept a candidate whose probability under the base
    model exceeds ``min(epsilon, alpha * exp(-entropy))``; keep the longest accepted path, then sample the
    next token from the base model's distribution at its end."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1)
    threshold = (sampling.typical_alpha * torch.exp(-entropy)).clamp_max(sampling.typical_epsilon)
    parents = tree.tensors(probs.device).parents
    ok = torch.ones_like(tokens, dtype=torch.bool)
    ok[1:] = probs[parents, tokens[1:]] > threshold[parents]
    accepted = longest_accepted_path(ok, tree)
    next_token = torch.multinomial(probs[accepted[-1]], 1, generator=generator)
    return accepted, int(next_token)
