"""Medusa heads: K small residual MLPs on the last hidden state, each predicting one token further ahead."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from medusa_lora.errors import CheckpointError
from medusa_lora.model.config import CONFIG_NAME, MedusaConfig

HEADS_FILE = "medusa_heads.safetensors"
IGNORE_INDEX = -100
MAX_TABLE_RATIO = 2  # path-shift tables at most twice the size of the path projections' weights
PATH_TABLES = "path tables"  # ``MedusaHeads._keep`` names: draft_path_shifts' tables,
OUTPUT_ROWS = "output rows"  # and (with the layer's id, the heads' dtype) a layer's draft-vocabulary rows

OutputLayer = Callable[[torch.Tensor], torch.Tensor]  # a head's transformed hidden state (..., H) -> logits


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
    begins from plain Medusa heads). With ``config.path_conditioned`` head k also sees the k tokens before its
    own on the draft's top-1 path (``path_proj``; Hydra's sequentially dependent heads): when drafting, head
    k runs after head k - 1 and sees its top-1 token. The tree stays static: every node at depth k takes head
    k's candidates given the top-1 path, which is exact on that path (where most accepted tokens are) and an
    approximation off it. ``conditioning_tokens`` says how many tokens after the input position the heads
    read (0, 1 or K).

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
        self.root_proj: nn.Linear | None = None  # the root's share of every head's input: K blocks of H rows
        self.path_proj = nn.ModuleList()  # path_proj[j - 1]: the share of path token j in heads j..K-1
        if config.root_conditioned or config.path_conditioned:
            self.root_proj = _zero_linear(hidden, config.num_heads * hidden)
        if config.path_conditioned:
            self.path_proj.extend(
                _zero_linear(hidden, (config.num_heads - j) * hidden) for j in range(1, config.num_heads)
            )
        draft = torch.arange(config.draft_vocab_size) if config.draft_vocab_size else None
        self.register_buffer("draft_vocab", draft)  # a None buffer is left out of the state dict
        self._kept: dict[Hashable, tuple[tuple, Any]] = {}  # what ``_keep`` made, with its weights' key

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def dtype(self) -> torch.dtype | None:
        """The heads' weights' dtype: the model's, or a narrower one to draft in (``for_inference``); None for
        heads without weights of their own (no blocks, reading the model's LM head)."""
        return next((p.dtype for p in self.parameters()), None)

    def in_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the heads' dtype: a no-op unless they draft in a narrower one than the model's
        (``for_inference``), or have no weights of their own."""
        dtype = self.dtype
        return x if dtype is None else x.to(dtype)

    @property
    def vocab_size(self) -> int:
        """How many tokens a head scores: the draft vocabulary, else the full one."""
        return self.config.vocab_size if self.draft_vocab is None else self.draft_vocab.numel()

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Restrict the heads to ``token_ids`` (distinct ids); ``MedusaLoraModel.set_draft_vocab`` also records
        the size in the model's config, which loading needs."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if token_ids.unique().numel() != token_ids.numel():
            raise ValueError("draft vocabulary ids must be distinct")
        self.draft_vocab = token_ids.to(next(self.parameters(), token_ids).device)

    @property
    def conditioning_tokens(self) -> int:
        """How many tokens after the input position the heads read: 0, 1 (the root) or K (the root, then the
        top-1 path: head k reads the first k + 1)."""
        if self.config.path_conditioned:
            return self.num_heads
        return 1 if self.config.root_conditioned else 0

    def shifts(self, token_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """(..., J, H) -> (K, ..., H): what each conditioned head adds to its input from the embeddings of the J
        tokens after each position (the root first; head k of path-conditioned heads reads the first k + 1).
        None for heads that read no tokens."""
        needed = self.conditioning_tokens
        if needed == 0:
            return None
        if token_embeds is None or token_embeds.shape[-2] < needed:
            raise ValueError(
                f"conditioned heads read the embeddings of the {needed} token(s) after each position: "
                f"token_embeds has {0 if token_embeds is None else token_embeds.shape[-2]}"
            )
        shifts = list(self.root_shifts(token_embeds[..., 0, :]))
        for j in range(1, needed):
            add_path_shifts(shifts, j, self.path_shifts(j, token_embeds[..., j, :]))
        return torch.stack(shifts)

    def root_shifts(self, root_embeds: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """(..., H) -> (K, ..., H): the root's share in every head's input (one matmul for all heads); with
        ``heads``, in the first ``heads`` heads only, (heads, ..., H)."""
        heads = self.num_heads if heads is None else min(heads, self.num_heads)
        weight = self.root_proj.weight[: heads * self.config.hidden_size]  # head k's block: rows k*H..(k+1)*H
        return _by_head(F.linear(root_embeds.to(weight.dtype), weight), heads)

    def path_shifts(self, j: int, token_embeds: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (K - j, ..., H): path token j's share in the inputs of heads j..K-1."""
        weight = self.path_proj[j - 1].weight
        return _by_head(F.linear(token_embeds.to(weight.dtype), weight), self.num_heads - j)

    def draft_path_shifts(self, j: int, indices: torch.Tensor, embeddings: nn.Embedding) -> torch.Tensor:
        """``path_shifts`` for path token j given as ``indices`` (...) into the heads' logits (a draft):
        with a draft vocabulary and no autograd, rows of a table made once per set of weights for the whole
        draft vocabulary (``embeddings``: the base model's input embeddings).

        The tables hold V' / H times as many numbers as the projections they replace, so they are only made
        for draft vocabularies of at most ``MAX_TABLE_RATIO`` x H tokens (a task's few hundred tokens on a
        small model); otherwise each draft is projected as it comes."""
        tables = None
        if self.draft_vocab is not None and self.vocab_size <= MAX_TABLE_RATIO * self.config.hidden_size:

            def make_tables() -> list[torch.Tensor]:
                draft_embeds = embeddings(self.draft_vocab)
                return [self.path_shifts(i, draft_embeds) for i in range(1, self.num_heads)]

            weights = (embeddings.weight, self.draft_vocab, *(p.weight for p in self.path_proj))
            tables = self._keep(PATH_TABLES, weights, make_tables)
        if tables is None:
            return self.path_shifts(j, embeddings(self.token_ids(indices)))
        return tables[j - 1][:, indices]

    def head_hidden(self, head: int, hidden_states: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """(..., H) -> (..., H): head ``head``'s transformed hidden state, its input (in the heads' dtype,
        ``in_dtype``) shifted by ``shift`` (..., H) (row ``head`` of ``shifts``; None for heads that read no
        tokens)."""
        return self.blocks[head](hidden_states if shift is None else hidden_states + shift)

    def hidden(self, hidden_states: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> (K, ..., H): every head's transformed hidden state; ``token_embeds`` as in ``shifts``."""
        shifts, hidden_states = self.shifts(token_embeds), self.in_dtype(hidden_states)
        return torch.stack(
            [
                self.head_hidden(k, hidden_states, None if shifts is None else shifts[k])
                for k in range(self.num_heads)
            ]
        )

    def output_layers(self, lm_head: nn.Module, dtype: torch.dtype) -> list[OutputLayer]:
        """Each head's output layer over the tokens it scores: ``lm_head`` itself (the base model's output
        layer, packed or quantized as the model is, fed in the model's ``dtype``), or with a draft vocabulary
        its rows, gathered once per call (shared by heads that share ``lm_head``; without autograd, once per
        set of weights) and fed in the heads' dtype."""
        if self.lm_heads is None:
            return [self._output_layer(lm_head, dtype)] * self.num_heads
        return [self._output_layer(layer, layer.weight.dtype) for layer in self.lm_heads]

    def forward(
        self, hidden_states: torch.Tensor, lm_head: nn.Linear, token_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(..., H) -> (K, ..., vocab_size) head logits; ``lm_head`` is the base model's output layer,
        ``token_embeds`` as in ``shifts`` (teacher forcing: every head reads given tokens)."""
        head_hidden = self.hidden(hidden_states, token_embeds)
        layers = self.output_layers(lm_head, hidden_states.dtype)
        if self.lm_heads is None:
            return layers[0](head_hidden)  # one matmul for all heads
        return torch.stack([layer(h) for h, layer in zip(head_hidden, layers)])

    def draft_logits(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor | int,
        embeddings: nn.Embedding,
        lm_head: nn.Linear,
        path_ids: torch.Tensor | None = None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """The logits (K, ..., V') at positions with hidden states ``hidden`` (..., H) whose next tokens are
        ``next_ids`` (...): when drafting, the root. ``embeddings`` and ``lm_head`` are the base model's.

        Path-conditioned heads also read the tokens after the root: ``path_ids`` (..., K - 1) when given (teacher
        forcing), else their own top-1 drafts, head by head, as generation drafts; then only the first ``depth``
        heads run (a tree that deep reads no more), and the logits are (depth, ..., V')."""
        ids = torch.as_tensor(next_ids, device=hidden.device)[..., None]
        needed = self.conditioning_tokens
        if needed <= 1 or path_ids is not None:
            if path_ids is not None and needed > 1:
                ids = torch.cat([ids, path_ids[..., : needed - 1]], dim=-1)
            return self(hidden, lm_head, embeddings(ids) if needed else None)
        depth = self.num_heads if depth is None else min(depth, self.num_heads)
        # the root's share in each head's input, then each draft's share, as drafted
        shifts = list(self.root_shifts(embeddings(ids[..., 0]), depth))
        layers, logits = self.output_layers(lm_head, hidden.dtype), []
        hidden = self.in_dtype(hidden)  # once, not per head
        for k in range(depth):
            logits.append(layers[k](self.head_hidden(k, hidden, shifts[k])))
            if k + 1 < depth:
                draft = logits[-1].argmax(-1)  # an index into the heads' vocabulary
                add_path_shifts(shifts, k + 1, self.draft_path_shifts(k + 1, draft, embeddings))
        return torch.stack(logits)

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

    def _output_layer(self, layer: nn.Module, dtype: torch.dtype) -> OutputLayer:
        if self.draft_vocab is None:
            return lambda head_hidden: layer(head_hidden.to(dtype))
        weight, bias = layer.weight, layer.bias

        def gather() -> tuple[torch.Tensor, torch.Tensor | None]:
            rows = self.in_dtype(weight[self.draft_vocab])
            return rows, None if bias is None else self.in_dtype(bias[self.draft_vocab])

        weights = (weight, self.draft_vocab, *([] if bias is None else [bias]))
        kept = self._keep((OUTPUT_ROWS, id(layer), self.dtype), weights, gather)
        rows, row_bias = gather() if kept is None else kept
        return lambda head_hidden: F.linear(head_hidden.to(rows.dtype), rows, row_bias)

    def _keep(self, name: Hashable, weights: Sequence[torch.Tensor], make: Callable[[], Any]) -> Any | None:
        """``make()``, made once and kept under ``name`` while ``weights`` are unchanged (remade when one is
        replaced or changed in place, which its version counter shows). None under autograd, and for inference
        tensors (they keep no version): the caller then computes what it needs as it comes."""
        key = None if torch.is_grad_enabled() else _weights_key(*weights)
        if key is None:
            return None
        if name not in self._kept or self._kept[name][0] != key:
            self._kept[name] = (key, make())
        return self._kept[name][1]


def load_saved_heads(directory: Path, config: MedusaConfig) -> MedusaHeads:
    """The heads ``save_pretrained`` wrote to ``directory`` (``HEADS_FILE``), on the CPU; without a base model, so
    the caller checks them against the one they will draft for."""
    heads = MedusaHeads(config)
    heads.load_state_dict(_read_heads(directory / HEADS_FILE, heads))
    return heads


def add_path_shifts(shifts: list[torch.Tensor], j: int, path: torch.Tensor) -> None:
    """Add path token j's shares ``path`` (K - j, ..., H) to heads j.. of ``shifts`` (one per head; fewer than K
    when drafting only the first heads: the shares of the heads after them are not needed)."""
    for head, share in zip(range(j, len(shifts)), path):
        shifts[head] = shifts[head] + share


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., heads * H) -> (heads, ..., H)."""
    return x.unflatten(-1, (heads, -1)).movedim(-2, 0)


def _weights_key(*tensors: torch.Tensor) -> tuple | None:
    """Identity and in-place version of each tensor, to know when tables made from them are stale; None when one
    is an inference tensor (they keep no version)."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free projection that starts at zero, so conditioning starts from plain heads."""
    layer = nn.Linear(in_features, out_features, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


def _read_heads(path: Path, heads: MedusaHeads) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: no Medusa heads to load")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in heads.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(
            f"{path} does not match {CONFIG_NAME}: missing {missing}, unexpected {extra}, wrong shapes {wrong}"
        )
    return state
