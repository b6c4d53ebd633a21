"""The memory a training run needs per device, estimated before it starts from the model's config and the run's.

Counted per device, in bytes: the frozen base's weights; what runs whole for a moment (FSDP's gathered root and
layers, a 4-bit weight dequantized); the trained LoRA and heads (float32), their gradients and AdamW's two
moments (float32 each); the activations the forward keeps for the backward at ``batch_size`` sequences of
``max_length`` tokens, every position labelled (the most a batch can hold); and the LM's and heads' logits with
their cross-entropy. Under FSDP the base, the trained tensors, their gradients and moments are 1/N each.

The parameter counts are exact (the model and the heads are built on the meta device); the activations follow
what autograd keeps in a Llama-style decoder layer trained through LoRA on a frozen base (listed in
``_layer_activations``). ``tests/test_memory.py`` checks the total against the peak of live tensors measured on
small models.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from medusa_lora.model.heads import MedusaHeads
from medusa_lora.training.build import heads_config
from medusa_lora.training.config import TrainConfig

GIB = 2**30
FP32 = 4
# 4-bit NF4 / FP4 weights (bitsandbytes, blocks of 64): half a byte each, plus one float32 absmax per block; with
# double quantization an 8-bit absmax per block and one float32 per 256 blocks
FOUR_BIT = 0.5 + FP32 / 64
FOUR_BIT_DOUBLE_QUANT = 0.5 + 1 / 64 + FP32 / (64 * 256)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per device, in bytes, by what holds it."""

    base: float  # the frozen base's weights (this device's shard under FSDP)
    transient: float  # whole for a moment: FSDP's gathered root and layers; a 4-bit weight dequantized
    trained: float  # LoRA and heads, float32
    gradients: float  # theirs, float32 (with DDP's buckets)
    optimizer: float  # AdamW's two moments, float32
    activations: float  # kept by the decoder layers for the backward
    logits: float  # the LM's and heads' logits, log-probabilities and their gradient
    recomputed: float  # with gradient checkpointing, one layer's activations, recomputed in the backward
    attention: float = 0.0  # SDPA's math backend: one layer's scores and probabilities while it runs

    @property
    def total(self) -> float:
        """The sum, but the logits, a recomputed layer and a layer's attention scores are not live together: the
        backward frees the logits before it reaches the layers, and a layer frees its scores when it is done."""
        held = sum(getattr(self, f.name) for f in fields(self)[:-3])
        return held + max(self.logits, self.recomputed, self.attention)

    def __str__(self) -> str:
        parts = ", ".join(f"{f.name} {getattr(self, f.name) / GIB:.2f}" for f in fields(self))
        return f"{self.total / GIB:.2f} GiB per device ({parts})"


def estimate_memory(
    model_config: PretrainedConfig,
    cfg: TrainConfig,
    precision: str,
    processes: int = 1,
    fsdp: bool = False,
    math_attention: bool = False,
) -> MemoryEstimate:
    """The peak memory per device of training ``cfg`` on a base with ``model_config``, under mixed ``precision``
    (``no``, ``bf16``, ``fp16``: what the trainer resolved ``auto`` to), with ``processes`` processes, sharded
    over them with ``fsdp``; ``math_attention``: attention runs SDPA's math backend, which keeps its
    probabilities (the trainer's choice on a CPU, ``loop.training_attention``)."""
    base = _meta_base(model_config)
    counts = _ParamCounts(base, cfg)
    shards = processes if fsdp else 1
    weight_bytes = _weight_bytes(cfg)
    compute = 2 if precision in ("bf16", "fp16") else _element_size(cfg.base_dtype)
    base_bytes = counts.linear * weight_bytes + counts.other * _element_size(_unquantized_dtype(cfg))
    trained = counts.lora + counts.heads
    transient = 0.0
    if fsdp:  # the root (all but the layers) stays gathered through forward and backward, and two layers are
        # gathered at a time (the one running and the one prefetched), with the heads' gradients before reducing
        root = base_bytes - counts.layers * counts.layer_bytes(weight_bytes)
        transient += root + 2 * counts.layer_bytes(weight_bytes) + FP32 * counts.heads
    if cfg.load_in_4bit:
        transient += compute * counts.largest_linear
    tokens = cfg.batch_size * cfg.max_length
    buckets = FP32 * trained if processes > 1 and not fsdp else 0  # DDP's gradient buckets
    kept, recomputed = _activations(model_config, cfg, counts, tokens, compute, math_attention)
    return MemoryEstimate(
        base=base_bytes / shards,
        transient=transient,
        trained=FP32 * trained / shards,
        gradients=FP32 * trained / shards + buckets,
        optimizer=2 * FP32 * trained / shards,
        activations=kept,
        logits=_logits(model_config, cfg, tokens, compute),
        recomputed=recomputed,
        attention=3 * FP32 * model_config.num_attention_heads * cfg.max_length * tokens
        if math_attention
        else 0.0,
    )


class _ParamCounts:
    """Parameters of the base (4-bit-quantizable linears in the decoder layers and the rest), of the LoRA and of
    the heads, counted on the meta device."""

    def __init__(self, base: nn.Module, cfg: TrainConfig) -> None:
        config = base.config
        self.layers = config.num_hidden_layers
        first = self.layers - (cfg.lora_last_layers or self.layers)
        self.first_lora_layer = first if cfg.trains_lora else self.layers
        layer_linears = [
            (name, m)
            for name, m in base.named_modules()
            if isinstance(m, nn.Linear) and _layer_of(name) is not None
        ]
        self.linear = sum(m.weight.numel() for _, m in layer_linears)
        self.largest_linear = max((m.weight.numel() for _, m in layer_linears), default=0)
        unique = {id(p): p for p in base.parameters()}.values()  # tied embeddings once
        self.other = sum(p.numel() for p in unique) - self.linear
        self.layer_other = sum(p.numel() for n, p in base.named_parameters() if _layer_of(n) == 0) - sum(
            m.weight.numel() for n, m in layer_linears if _layer_of(n) == 0
        )
        self.lora_inputs: list[int] = []  # per LoRA layer, the input width of each adapted linear
        self.lora = 0
        if cfg.trains_lora:
            for name, module in layer_linears:
                if name.rsplit(".", 1)[-1] in cfg.lora_target_modules and _layer_of(name) >= first:
                    self.lora += cfg.lora_r * (module.in_features + module.out_features)
                    if _layer_of(name) == first:
                        self.lora_inputs.append(module.in_features)
        heads = _meta_heads(config, cfg) if cfg.trains_heads else None
        self.heads = 0 if heads is None else sum(p.numel() for p in heads.parameters())

    def layer_bytes(self, weight_bytes: float) -> float:
        """One decoder layer's weights."""
        return self.linear / self.layers * weight_bytes + self.layer_other * FP32


def _activations(
    config: PretrainedConfig,
    cfg: TrainConfig,
    counts: _ParamCounts,
    tokens: int,
    compute: int,
    math_attention: bool,
) -> tuple[float, float]:
    """(kept through the forward, recomputed in the backward): what the decoder layers from the first LoRA layer
    up keep for the backward (none in heads mode: nothing below the heads trains). With gradient checkpointing
    each keeps only its inputs (the hidden states in the embeddings' dtype, one attention mask for all), and one
    layer's activations are recomputed at a time."""
    with_grad = counts.layers - counts.first_lora_layer
    if with_grad == 0:
        return 0.0, 0.0
    layer = _layer_activations(config, cfg, counts, tokens, compute, math_attention)
    if compute < _element_size(cfg.base_dtype) and not cfg.load_in_4bit:
        # autocast keeps each frozen weight's cast for the backward (bitsandbytes keeps the 4-bit one)
        layer += compute * counts.linear / counts.layers
    if cfg.gradient_checkpointing:
        residual = _element_size(_unquantized_dtype(cfg))
        return tokens * (with_grad * residual * config.hidden_size + compute * cfg.max_length), layer
    return with_grad * layer, 0.0


def _layer_activations(
    config: PretrainedConfig,
    cfg: TrainConfig,
    counts: _ParamCounts,
    tokens: int,
    compute: int,
    math_attention: bool,
) -> float:
    """One decoder layer's saved tensors (as listed by autograd's saved-tensor hooks on a Llama): six float32
    hidden-size tensors (the two RMSNorms' input and normalised output, and two of the residual stream's);
    attention's query, keys and values (repeated to every query head), output, log-sum-exp and padding mask
    (``max_length`` per token; under the math backend its probabilities instead of the last two, ``max_length``
    per token and head, float32); the MLP's gate, activation, up projection and their product; each LoRA's two inputs (before
    ``lora_A`` and ``lora_B``), in the compute dtype."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    query = config.num_attention_heads * head_dim
    per_token = 6 * FP32 * hidden
    per_token += compute * 4 * query
    if math_attention:  # its probabilities, float32
        per_token += FP32 * config.num_attention_heads * cfg.max_length
    else:  # its log-sum-exp and padding mask
        per_token += FP32 * config.num_attention_heads + compute * cfg.max_length
    per_token += 4 * compute * inner
    per_token += sum(compute * (width + cfg.lora_r) for width in counts.lora_inputs)
    return tokens * per_token


def _logits(config: PretrainedConfig, cfg: TrainConfig, tokens: int, compute: int) -> float:
    """Every labelled position's logits: the LM's (trained, or the teacher of distilled heads) and each head's
    over its vocabulary, kept as float32 log-probabilities for the cross-entropy's backward plus a copy in the
    compute dtype, and one of them at a time as float32 gradients."""
    vocab = config.vocab_size
    heads_vocab = cfg.draft_vocab_size or vocab
    scored = (vocab if cfg.trains_lora or cfg.head_targets == "distill" else 0) + (
        cfg.num_heads * heads_vocab if cfg.trains_heads else 0
    )
    return tokens * (scored * (FP32 + compute) + 2 * FP32 * max(vocab, heads_vocab))


def _meta_base(config: PretrainedConfig) -> nn.Module:
    """The base's modules, dense, with no storage (a loaded 4-bit base's config drops its quantization)."""
    config = copy.deepcopy(config)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _meta_heads(config: PretrainedConfig, cfg: TrainConfig) -> MedusaHeads:
    medusa = heads_config(cfg, hidden_size=config.hidden_size, vocab_size=config.vocab_size)
    with torch.device("meta"):
        return MedusaHeads(medusa)


def _layer_of(name: str) -> int | None:
    """The decoder layer index in a parameter or module name (``model.layers.3.mlp.up_proj``), if any."""
    match = _LAYER_INDEX.search(f".{name}.")
    return None if match is None else int(match.group(1))


def _weight_bytes(cfg: TrainConfig) -> float:
    if cfg.load_in_4bit:
        return FOUR_BIT_DOUBLE_QUANT if cfg.bnb_4bit_use_double_quant else FOUR_BIT
    return _element_size(cfg.base_dtype)


def _unquantized_dtype(cfg: TrainConfig) -> str:
    """The dtype of what 4-bit loading leaves unquantized (embeddings, norms, LM head): float32, as peft's
    ``prepare_model_for_kbit_training`` casts them; else the base's."""
    return "float32" if cfg.load_in_4bit else cfg.base_dtype


def _element_size(dtype: str) -> int:
    return getattr(torch, dtype).itemsize
