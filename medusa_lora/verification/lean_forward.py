"""The decoder's step driven layer by layer on a CPU: a preallocated KV cache and the CPU extension's kernels.

transformers' forward spends more time on its glue than a small model spends on its weights on a CPU (a mask
built per call, the rotary embedding's eight ops, the dynamic cache's concatenations, the attention dispatch, and
the interpreter around ~20 small ops a layer). ``LeanForward`` runs the embeddings, the rotary table, the final
norm and the LM head as the model's own modules, and the layers in the extension's ``DecoderLayers``
(csrc/decoder_layers.cpp): each layer's operations in transformers' order from C++ - RMSNorm as its ATen ops, the
linear groups (q / k / v, o, gate / up, down) on the low-bit (int4 / int8) and LoRA kernels with the arguments
``LinearGroup`` gathers (any other weight format through ``LinearGroup`` itself), ``rotary_`` straight into the
cache, values copied in place, the CPU tree kernel over the cache's first ``prefix + T`` rows (which one-token
calls of the eager forward run too), SiLU and the residual adds. So its hidden states and logits equal
``EagerForward``'s bit for bit (tests/test_forward.py), and the greedy output transformers' ``generate``.

The prefill runs transformers' forward (prompts vary in length; once per call), then its cache is copied in.
Llama-family decoders only (llama, mistral, qwen2: pre-norm, rotary, GQA, an MLP module), in fp32.
"""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from medusa_lora.errors import ConfigError
from medusa_lora.kernels import compact_kv, kernel_backend
from medusa_lora.kernels._cpu import extension
from medusa_lora.model.quantize import LinearGroup
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import TokenTree

from .attention import packed_tree_mask

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ONE = torch.ones(1, 1, dtype=torch.int32)


def why_not_lean(model: MedusaLoraModel, positions: int | None = None) -> str:
    """Why ``LeanForward`` cannot run ``model`` here for sequences of up to ``positions`` positions (None: any
    length), or "" when it can."""
    config = model.model_config
    if model.device.type != "cpu" or kernel_backend(model.device) != "cpu":
        return "it needs the CPU extension's kernels on a CPU"
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} (it drives {', '.join(MODEL_TYPES)})"
    if model.dtype != torch.float32:
        return f"{model.dtype} (it runs fp32)"
    attention, mlp = model.decoder.layers[0].self_attn, model.decoder.layers[0].mlp
    if any(hasattr(attention, name) for name in ("q_norm", "k_norm", "sinks")):
        return "attention with norms or sinks of its own"
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return f"an MLP other than a gated one ({type(mlp).__name__})"
    if getattr(config, "layer_types", None) and any(kind != "full_attention" for kind in config.layer_types):
        return "sliding-window layers"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and (positions is None or positions > window):  # the kernel attends to every cached key
        return f"a sliding window of {window} positions, shorter than the sequence"
    return ""


class LeanForward:
    """``DecoderForward`` of ``capacity`` positions on the CPU kernels (see the module's docstring), for sequences
    of up to ``positions`` (a sliding window must cover them; default: ``capacity``)."""

    capture_time_s = 0.0

    def __init__(self, model: MedusaLoraModel, capacity: int, positions: int | None = None) -> None:
        reason = why_not_lean(model, capacity if positions is None else positions)
        if reason:
            raise ConfigError(f"the lean CPU forward cannot run this model: {reason}")
        self._model = weakref.ref(model)  # cached per model by decoder_forward: no reference back to it
        self.capacity = capacity
        config = model.model_config
        self.layers = config.num_hidden_layers
        attention = model.decoder.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = config.num_key_value_heads
        self.heads = config.num_attention_heads
        shape = (1, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape) for _ in range(self.layers)]
        self.values = [torch.zeros(shape) for _ in range(self.layers)]
        self._layers = extension().DecoderLayers(self.heads, self.kv_heads, self.head_dim)
        for layer, keys, values in zip(model.decoder.layers, self.keys, self.values):
            linears = [LinearGroup(group).kernel_spec() for group in _linear_groups(layer)]
            act = layer.mlp.act_fn
            self._layers.add_layer(
                _norm_spec(layer.input_layernorm),
                _norm_spec(layer.post_attention_layernorm),
                *linears,
                None if type(act) in (SiLUActivation, torch.nn.SiLU) else act,
                keys,
                values,
                float(layer.self_attn.scaling),
            )

    @property
    def model(self) -> MedusaLoraModel:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this LeanForward was garbage-collected")
        return model

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = input_ids.shape[1]
        self._check_room(0, length)
        model = self.model
        cache = DynamicCache(config=model.model_config)
        hidden = model.hidden_states(input_ids, cache=cache, use_cache=True)[0, -1]
        for layer, keys, values in zip(cache.layers, self.keys, self.values):
            keys[:, :, :length].copy_(layer.keys)
            values[:, :, :length].copy_(layer.values)
        return hidden, model.lm_head(hidden)

    def score(
        self, tokens: torch.Tensor, tree: TokenTree, prefix_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = tree.size
        self._check_room(prefix_len, size)
        model = self.model
        decoder = model.decoder
        bits = packed_tree_mask(tree, model.device) if size > 1 else _ONE
        positions = (prefix_len + tree.tensors(model.device).depths)[None]
        hidden = decoder.embed_tokens(tokens[None])
        cos, sin = decoder.rotary_emb(hidden, positions)
        hidden = self._layers.step(hidden, cos, sin, bits, prefix_len)
        hidden = decoder.norm(hidden)[0]
        return hidden, model.lm_head(hidden)

    def keep(self, prefix_len: int, accepted: torch.Tensor) -> None:
        if int(accepted[-1]) != len(accepted) - 1:  # a chain along the first nodes is already in place
            compact_kv(self.keys, self.values, prefix_len, accepted)

    def rewind(self, length: int) -> None:
        """Nothing to do: a step reads only the rows before its own and overwrites what follows."""

    def _check_room(self, prefix_len: int, size: int) -> None:
        if prefix_len + size > self.capacity:
            raise ConfigError(
                f"{prefix_len} cached + {size} new tokens do not fit the lean forward's cache of {self.capacity}"
            )


def _norm_spec(norm: torch.nn.Module) -> tuple:
    """What ``DecoderLayers`` runs for a norm: transformers' RMSNorm as (weight, eps), any other as (module,)."""
    if type(norm) in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm):
        return (norm.weight.detach(), float(norm.variance_epsilon))
    return (norm,)


def _linear_groups(layer: torch.nn.Module) -> tuple[tuple[torch.nn.Module, ...], ...]:
    """A decoder layer's linear layers by the input they read: (q, k, v), (o,), (gate, up), (down,)."""
    attention, mlp = layer.self_attn, layer.mlp
    return (
        (attention.q_proj, attention.k_proj, attention.v_proj),
        (attention.o_proj,),
        (mlp.gate_proj, mlp.up_proj),
        (mlp.down_proj,),
    )
