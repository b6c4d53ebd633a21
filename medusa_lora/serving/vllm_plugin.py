"""Our heads in vLLM (0.32, unmodified): a ``custom_class`` speculative proposer that drafts the heads' top-1
path (``drafting.heads.top1_chain``) as the chain vLLM verifies, for any heads medusa-lora trains (plain, root-
or path-conditioned, a draft vocabulary, per-head LM heads), with the task LoRA served by vLLM's LoRA support.

    LLM(model=BASE, dtype="float32", enable_lora=True, max_lora_rank=16,
        speculative_config={"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 4},
        additional_config={HEADS_KEY: {"1": TASK_MODEL_DIR}})
    llm.generate(prompts, params, lora_request=LoRARequest("task", 1, TASK_MODEL_DIR))

``additional_config[HEADS_KEY]`` is a heads dir (a medusa-lora model dir or a heads-only one) for every request,
or a map from a LoRA's ``lora_int_id`` (``"0"``: requests without a LoRA) to the heads that draft for it:
each request is drafted by the heads of its own adapter, and requests with none get no drafts.

vLLM hands a ``custom_class`` proposer the sampled tokens only, so the proposer reads the rest from the target
model it is given at load: a forward hook keeps the last forward's hidden states (the normed last hidden
state vLLM's own Medusa proposer drafts from), its positions, its query start offsets (the attention
metadata of the forward context) and, with LoRA, each token's adapter slot (the LoRA manager's punica
wrapper). Each request drafts from the hidden state that produced its last sampled token, with that token
as the root. Importable without vLLM: vLLM is imported only when the engine calls in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medusa_lora.drafting.heads import top1_chain
from medusa_lora.errors import ConfigError
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.heads import MedusaHeads, load_saved_heads

PROPOSER = "medusa_lora.serving.vllm_plugin.MedusaLoraProposer"
HEADS_KEY = "medusa_lora_heads"
NO_LORA = 0  # the LoRA id of requests without an adapter


@dataclass
class ForwardStep:
    """What the proposer keeps of the target's last forward: hidden states (T, H) and positions (T,) of its
    tokens, the requests' query start offsets (R + 1,), and each token's LoRA id (T,), None without LoRA."""

    hidden: torch.Tensor
    positions: torch.Tensor
    query_starts: torch.Tensor
    lora_ids: torch.Tensor | None


def draft_rows(
    query_starts: torch.Tensor,
    positions: torch.Tensor,
    num_tokens: Sequence[int],
    sampled: Sequence[Sequence[int]],
) -> list[int | None]:
    """Per request, the row of the forward whose hidden state produced its last sampled token (None when it
    sampled none: a prefill chunk before the last). That token is the request's ``num_tokens``-th, so it came
    from position ``num_tokens - 2``, offset from the position of the request's first row."""
    rows: list[int | None] = []
    for i, tokens in enumerate(sampled):
        if not tokens:
            rows.append(None)
            continue
        start, end = int(query_starts[i]), int(query_starts[i + 1])
        row = start + int(num_tokens[i]) - 2 - int(positions[start])
        if not start <= row < end:
            raise RuntimeError(f"request {i}'s last sampled token is not from this forward (row {row})")
        rows.append(row)
    return rows


def parse_heads_config(value: str | Mapping[str, str]) -> dict[int, Path] | Path:
    """``additional_config[HEADS_KEY]``: one dir for every request, or LoRA id -> dir."""
    if isinstance(value, str):
        return Path(value)
    if isinstance(value, Mapping) and value:
        try:
            return {int(lora_id): Path(directory) for lora_id, directory in value.items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{HEADS_KEY} maps LoRA ids (integers, 0: no LoRA) to heads dirs: {exc}"
            ) from exc
    raise ConfigError(f"{HEADS_KEY} is a heads dir, or a map from LoRA ids to heads dirs; got {value!r}")


class MedusaLoraProposer:
    """vLLM's ``custom_class`` proposer interface: ``__init__(vllm_config)``, ``load_model(target_model)``,
    ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings) -> drafts per request``."""

    def __init__(self, vllm_config: Any) -> None:
        extra = vllm_config.additional_config or {}
        if HEADS_KEY not in extra:
            raise ConfigError(
                f"pass additional_config={{{HEADS_KEY!r}: HEADS_DIR}} to serve medusa-lora heads"
            )
        self.heads_dirs = parse_heads_config(extra[HEADS_KEY])
        self.depth = vllm_config.speculative_config.num_speculative_tokens
        self.dtype = vllm_config.model_config.dtype
        self.max_model_len = vllm_config.model_config.max_model_len
        self.heads: dict[int, MedusaHeads] | MedusaHeads = {}
        self.step: ForwardStep | None = None

    def load_model(self, target_model: nn.Module) -> None:
        """Load the heads on the target's device and dtype, read its embeddings and LM head, hook its forward."""
        try:
            embed_weight = _base_weight(target_model.model.embed_tokens)
            lm_head_weight = _base_weight(target_model.lm_head)
        except AttributeError as exc:
            raise ConfigError(
                "the proposer reads the target's model.embed_tokens and lm_head (Llama-style vLLM models)"
            ) from exc
        device = lm_head_weight.device
        if isinstance(self.heads_dirs, Path):
            self.heads = self._load_heads(self.heads_dirs, device)
            vocab = self.heads.config.vocab_size
        else:
            self.heads = {i: self._load_heads(d, device) for i, d in self.heads_dirs.items()}
            vocab = next(iter(self.heads.values())).config.vocab_size
        with torch.no_grad():
            self.embeddings = nn.Embedding.from_pretrained(embed_weight[:vocab], freeze=True)
            self.lm_head = nn.Linear(lm_head_weight.shape[1], vocab, bias=False, device="meta")
            self.lm_head.weight = nn.Parameter(lm_head_weight[:vocab], requires_grad=False)
        target_model.register_forward_hook(self._keep_step, with_kwargs=True)

    def _load_heads(self, directory: Path, device: torch.device) -> MedusaHeads:
        config = MedusaConfig.load(directory)
        if self.depth > config.num_heads:
            raise ConfigError(
                f"num_speculative_tokens {self.depth} > the {config.num_heads} heads in {directory}"
            )
        return load_saved_heads(directory, config).to(device=device, dtype=self.dtype).eval()

    def _keep_step(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or not metadata:  # a dummy run, or micro-batches (not served)
            self.step = None
            return
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        self.step = ForwardStep(
            hidden,
            kwargs["positions"],
            next(iter(metadata.values())).query_start_loc,
            _token_lora_ids(module),
        )

    @torch.inference_mode()
    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Each request's draft: its heads' top-1 path from the hidden state of its last sampled token."""
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        step = self.step
        if step is None:
            return drafts
        rows = draft_rows(step.query_starts, step.positions, num_tokens_no_spec, sampled_token_ids)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if row is not None and num_tokens_no_spec[i] < self.max_model_len:  # as vLLM's ngram
                lora_id = NO_LORA if step.lora_ids is None else int(step.lora_ids[row])
                groups.setdefault(lora_id, []).append(i)
        for lora_id, requests in groups.items():
            heads = self.heads if isinstance(self.heads, MedusaHeads) else self.heads.get(lora_id)
            if heads is None:
                continue  # no heads for this adapter: its requests decode plainly
            index = torch.tensor([rows[i] for i in requests], device=step.hidden.device)
            roots = torch.tensor([sampled_token_ids[i][-1] for i in requests], device=step.hidden.device)
            chains = top1_chain(heads, step.hidden[index], roots, self.embeddings, self.lm_head, self.depth)
            for i, chain in zip(requests, chains.tolist()):
                drafts[i] = chain
        return drafts


def _base_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight, under vLLM's LoRA wrapper when there is one."""
    return getattr(module, "base_layer", module).weight


def _token_lora_ids(model: nn.Module) -> torch.Tensor | None:
    """Each token's LoRA id (``NO_LORA`` for none) in the forward just run, from vLLM's LoRA manager; None
    without LoRA."""
    manager = getattr(model, "lora_manager", None)
    if manager is None:
        return None
    from vllm.lora.model_manager import DEFAULT_LANGUAGE_WRAPPER_KEY

    slots = manager.punica_wrapper_mapping[DEFAULT_LANGUAGE_WRAPPER_KEY].token_lora_indices.cpu()
    ids = torch.tensor([NO_LORA if i is None else i for i in manager.lora_index_to_id] + [NO_LORA])
    return ids[slots]  # slot -1 (no LoRA) takes the last entry
