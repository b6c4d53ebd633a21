"""How a step's tokens run through the decoder: ``EagerForward`` (a dynamic cache, shapes as they come),
``StaticForward`` (a static cache and fixed shapes, replayed as one CUDA graph per tree size on a GPU) or, on a
CPU, ``LeanForward`` (``lean_forward``: the layers driven directly on the CPU kernels).

All score ``tokens`` (T,) after ``prefix_len`` cached positions (position ``prefix_len + depth``, each token
attending to the prefix and its tree ancestors) and return the hidden states (T, H) and logits (T, V); ``keep``
then leaves the prefix and the accepted path in the cache. The static form takes ``prefix_len`` as a device
tensor, builds the mask on the device and writes the cache in place, so one graph serves every step of a size:
a step is one launch instead of hundreds, which is what bounds a small model on a GPU (docs/decisions.md).
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Protocol
from weakref import WeakKeyDictionary

import torch
from transformers import DynamicCache

from medusa_lora.errors import ConfigError
from medusa_lora.model.base import takes_cache_position
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import TokenTree
from medusa_lora.verification.attention import tree_attention_kwargs
from medusa_lora.verification.kv_cache import StaticKVCache, compact_cache, truncate_cache
from medusa_lora.verification.lean_forward import LeanForward, why_not_lean


class DecoderForward(Protocol):
    """A decoder over one cache (one sequence): ``capacity`` positions (None: the model's context), and
    ``capture_time_s`` seconds spent capturing graphs so far."""

    capacity: int | None
    capture_time_s: float

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt (1, P) into an empty cache -> the last position's hidden state (H,) and logits (V,)."""

    def score(
        self, tokens: torch.Tensor, tree: TokenTree, prefix_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tree's ``tokens`` (T,) after ``prefix_len`` cached ones -> hidden states (T, H), logits (T, V)."""

    def keep(self, prefix_len: int, accepted: torch.Tensor) -> None:
        """Keep the prefix and the accepted tree nodes (indices from the root down) in the cache."""

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on."""


class EagerForward:
    """transformers' forward on a ``DynamicCache``: any length, no setup; tree steps attend through
    ``verification.attention`` (the Triton kernel where the backend is triton)."""

    capacity = None
    capture_time_s = 0.0

    def __init__(self, model: MedusaLoraModel) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.model_config)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.hidden_states(input_ids, cache=self.cache, use_cache=True)[0, -1]
        return hidden, self.model.lm_head(hidden)

    def score(
        self, tokens: torch.Tensor, tree: TokenTree, prefix_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        attention = tree_attention_kwargs(model.causal_lm, tree, prefix_len) if tree.size > 1 else {}
        hidden = model.hidden_states(
            tokens[None],
            position_ids=(prefix_len + tree.tensors(model.device).depths)[None],
            cache=self.cache,
            use_cache=True,
            **attention,
        )[0]
        return hidden, model.lm_head(hidden)

    def keep(self, prefix_len: int, accepted: torch.Tensor) -> None:
        compact_cache(self.cache, prefix_len, accepted)

    def rewind(self, length: int) -> None:
        truncate_cache(self.cache, length)


class StaticForward:
    """The decoder on a ``StaticKVCache`` of ``capacity`` positions, every step of T tokens one fixed-shape
    function of (tokens (T,), depths (T,), ancestors (T, T), prefix_len ()), all device tensors; with
    ``cuda_graphs`` each T is captured once into a CUDA graph (sharing one memory pool) and replayed after.

    Attention reads all ``capacity`` columns under an additive mask (the prefix and the token's ancestors
    visible): more FLOPs than a dynamic cache, no shape that changes."""

    def __init__(self, model: MedusaLoraModel, capacity: int, cuda_graphs: bool = False) -> None:
        if cuda_graphs and model.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA model; this one is on {model.device}")
        self._model = weakref.ref(model)  # the cache below is keyed by the model: no reference back to it
        self.capacity, self.cuda_graphs = capacity, cuda_graphs
        self.cache = StaticKVCache(capacity, model.model_config.num_hidden_layers)
        device = model.device
        self._columns = torch.arange(capacity, device=device)
        self._prefix = torch.zeros((), dtype=torch.long, device=device)
        self._graphs: dict[int, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.capture_time_s = 0.0
        self._cache_position = takes_cache_position(model.decoder)

    @property
    def model(self) -> MedusaLoraModel:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this StaticForward was garbage-collected")
        return model

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = input_ids.shape[1]
        self._check_room(0, length)
        device = self.model.device
        self._prefix.zero_()
        depths = torch.arange(length, device=device)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        hidden, logits = self._forward(input_ids[0], depths, causal, self._prefix)
        return hidden[-1], logits[-1]

    def score(
        self, tokens: torch.Tensor, tree: TokenTree, prefix_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_room(prefix_len, tree.size)
        tensors = tree.tensors(self.model.device)
        self._prefix.fill_(prefix_len)
        if not self.cuda_graphs:
            return self._forward(tokens, tensors.depths, tensors.mask, self._prefix)
        graph = self._graphs.get(tree.size)
        if graph is None:
            start = time.perf_counter()
            graph = self._graphs[tree.size] = _Graph(self, tokens, tensors.depths, tensors.mask)
            self.capture_time_s += time.perf_counter() - start
        return graph.replay(tokens, tensors.depths, tensors.mask)

    def keep(self, prefix_len: int, accepted: torch.Tensor) -> None:
        self.cache.keep(prefix_len, accepted)

    def rewind(self, length: int) -> None:
        """Nothing to do: positions past the prefix are masked out, and the next step overwrites them."""

    def _check_room(self, prefix_len: int, size: int) -> None:
        if prefix_len + size > self.capacity:
            raise ConfigError(
                f"{prefix_len} cached + {size} new tokens do not fit the static cache of {self.capacity}"
            )

    def _forward(
        self, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor, prefix_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step as device ops only (capturable): visible(t, j) = j < prefix_len or ancestors[t, j - prefix_len]."""
        model, size = self.model, tokens.shape[0]
        relative = self._columns - prefix_len  # (L,)
        in_tree = (relative >= 0) & (relative < size)
        visible = (relative < 0) | (in_tree & ancestors.index_select(1, relative.clamp(0, size - 1)))
        mask = torch.zeros(visible.shape, dtype=model.dtype, device=visible.device)
        mask = mask.masked_fill(~visible, torch.finfo(model.dtype).min)[None, None]
        self.cache.write_positions = prefix_len + self._columns[:size]
        extra = {"cache_position": self.cache.write_positions} if self._cache_position else {}
        hidden = model.hidden_states(
            tokens[None],
            position_ids=(prefix_len + depths)[None],
            cache=self.cache,
            use_cache=True,
            attention_mask=mask,  # a 4D mask: transformers builds none of its own
            tree_mask=mask,
            **extra,
        )[0]
        return hidden, model.lm_head(hidden)


class _Graph:
    """One step size captured: static input buffers, the graph, and its output tensors (overwritten by its
    next replay: read them before the next step)."""

    def __init__(
        self, owner: StaticForward, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor
    ) -> None:
        self.tokens, self.depths, self.ancestors = tokens.clone(), depths.clone(), ancestors.clone()
        run = lambda: owner._forward(self.tokens, self.depths, self.ancestors, owner._prefix)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (lazy inits, cuBLAS workspaces) off the capture
            run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=owner._pool):
            self.outputs = run()

    def replay(
        self, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokens.copy_(tokens)
        self.depths.copy_(depths)
        self.ancestors.copy_(ancestors)
        self.graph.replay()
        return self.outputs


# One StaticForward / LeanForward per (model, weights state, dtype, capacity): graphs are captured (caches
# allocated) once and reused by every generate() call that fits (a few entries; the oldest is dropped), and go
# with the model.
_STATIC: WeakKeyDictionary[MedusaLoraModel, dict[tuple, DecoderForward]] = WeakKeyDictionary()
_MAX_PER_MODEL = 4
CAPACITY_STEP = 512
# "0": eager everywhere (the CLI's --no-fast-path), "1": the fast forward, the static one where lean cannot run
ENV_VAR = "MEDUSA_LORA_FAST_PATH"


def _forced() -> bool | None:
    forced = os.environ.get(ENV_VAR, "")
    if forced not in ("", "0", "1"):
        raise ConfigError(f"{ENV_VAR}={forced!r} is invalid; allowed values: 0, 1")
    return None if not forced else forced == "1"


def fast_by_default(device: torch.device) -> bool:
    """Whether ``generate(fast=None)`` takes the device's fast forward: ``$MEDUSA_LORA_FAST_PATH`` if set, else
    yes (CUDA: the static forward with CUDA graphs; a CPU: the lean forward where it supports the model)."""
    forced = _forced()
    return True if forced is None else forced


def forward_kind(model: MedusaLoraModel, fast: bool | None = None, positions: int | None = None) -> str:
    """Which forward ``generate(fast=fast)`` runs for ``model``: "eager", "static" or "lean". On a CPU the fast
    forward is the lean one; where it cannot run the model, eager by default (static shapes gain nothing on a
    CPU: docs/fast-path.md), the static forward when asked for (``fast=True`` or ``MEDUSA_LORA_FAST_PATH=1``).
    ``positions``: the longest sequence it will hold (a sliding window must cover it; None: any)."""
    if not (fast_by_default(model.device) if fast is None else fast):
        return "eager"
    if model.device.type == "cuda":
        return "static"
    if not why_not_lean(model, positions):
        return "lean"
    asked = fast if fast is not None else _forced() is True
    return "static" if asked else "eager"


FORWARD_NAMES = {
    "eager": "eager (dynamic cache)",
    "lean": "lean (CPU kernels, preallocated cache)",
    "static": "static cache",
}


def forward_name(model: MedusaLoraModel, fast: bool | None = None) -> str:
    """What ``generate(fast=fast)`` runs for ``model``, in words (reports and benchmarks label rows with it)."""
    kind = forward_kind(model, fast)
    if kind == "static" and model.device.type == "cuda":
        return "static cache + CUDA graphs"
    return FORWARD_NAMES[kind]


def decoder_forward(model: MedusaLoraModel, positions: int, fast: bool | None = None) -> DecoderForward:
    """The forward ``generate()`` runs for a sequence of up to ``positions`` positions (``forward_kind``): a cached
    ``StaticForward`` (CUDA graphs on CUDA) or ``LeanForward`` of ``positions`` rounded up to ``CAPACITY_STEP``,
    or an ``EagerForward``."""
    kind = forward_kind(model, fast, positions)
    if kind == "eager":
        return EagerForward(model)
    cuda = model.device.type == "cuda"
    context = model.model_config.max_position_embeddings
    capacity = min(context, -(-positions // CAPACITY_STEP) * CAPACITY_STEP)
    key = (_weights_state(model), model.dtype, capacity, kind)
    cached = _STATIC.setdefault(model, {})
    if key not in cached:
        if len(cached) >= _MAX_PER_MODEL:
            cached.pop(next(iter(cached)))
        made = (
            LeanForward(model, capacity, positions)
            if kind == "lean"
            else StaticForward(model, capacity, cuda_graphs=cuda)
        )
        cached[key] = made
    return cached[key]


def _weights_state(model: MedusaLoraModel) -> tuple:
    """What a captured graph baked in: the weights' storage and which LoRA adapters are on (a served base
    switches adapters between requests)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in model.causal_lm.modules() if isinstance(m, BaseTunerLayer)), None)
    lora = None if layer is None else (tuple(layer.active_adapters), bool(layer.disable_adapters))
    return model.lm_head.weight.data_ptr(), lora
