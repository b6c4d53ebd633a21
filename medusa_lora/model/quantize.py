"""Generating on low-bit weights: every linear layer of the decoder holds its weight in int8 or int4
(``medusa_lora.kernels.quantized_linear``), the LM head in int8, a task LoRA beside them unmerged.

Why the LoRA stays unmerged: ``x Q(W)^T + s (x A^T) B^T`` is the quantized base model plus the exact LoRA, so
the task model on quantized weights is the base model its users quantized (the GGUF they run) with the adapter
they trained; merging first, ``Q(W + s B A)``, rounds most of the adapter's update away (its entries are far
below a 4-bit group's step). The price is two rank-r matmuls per layer.

Why the LM head in int8 under ``int4`` too: its logits choose every token, and 4 bits there costs quality
(llama.cpp's 4-bit files keep it in 8 bits, Q8_0, as the demo model's GGUF does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from medusa_lora.kernels.lora_add import lora_add_many_
from medusa_lora.kernels.lowbit_matmul import int4_matmul_many
from medusa_lora.kernels.quantized_linear import (
    INT4_GROUP_SIZE,
    Int4Weight,
    Int8Weight,
    int4_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
)

WEIGHTS = ("int8", "int4")


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's low-rank update ``scaling * B A``: ``a`` (r, K), ``b`` (N, r).
    Added row by row (``lora_add_many_``, fp32 on a CPU): a tree's rows get what one-token steps get, bit for bit."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @functools.cached_property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, scaling B), as ``lora_add_many_`` takes an update."""
        return self.a.contiguous(), (self.b * self.scaling).contiguous()


class QuantizedLinear(nn.Module):
    """An inference-only linear layer on an int8 or int4 weight, plus unmerged LoRA updates.

    ``y = x Q(W)^T + b + sum_i s_i (x A_i^T) B_i^T``, x (..., K) in the model's dtype. With ``keep_weight`` the
    float ``weight`` stays readable (the LM head: the heads gather draft-vocabulary rows from it; tied to the
    input embeddings it costs no memory); otherwise it is dropped. Quantize on the device it will run on.
    """

    def __init__(
        self,
        linear: nn.Linear,
        bits: str,
        lora: tuple[LoraUpdate, ...] = (),
        keep_weight: bool = False,
        group_size: int = INT4_GROUP_SIZE,
    ) -> None:
        super().__init__()
        _check_width(bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if bits == "int4" and self.in_features % group_size:
            bits = "int8"  # int4 groups must tile the row; such a layer keeps 8 bits
        self.bits = bits
        self.quantized: Int4Weight | Int8Weight = (
            quantize_int4(weight, group_size) if bits == "int4" else quantize_int8(weight)
        )
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.lora = lora
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "QuantizedLinear is for inference: it has no backward (use torch.inference_mode())"
            )
        linear = int4_linear if self.bits == "int4" else int8_linear
        return self.finish(linear(x, self.quantized), x)

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` (x's product with the quantized weight) plus the bias and the LoRA updates of ``x``."""
        return _finish((self,), [y], x)[0]

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K): the weight the layer computes with, the LoRA updates included."""
        weight = self.quantized.dequantize()
        for update in self.lora:
            weight = weight + update.scaling * (update.b @ update.a)
        return weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weights={self.bits}, "
            f"bias={self.bias is not None}, lora={len(self.lora)}"
        )


def forward_many(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``layers``' forward on the same ``x`` (a layer's q, k, v projections; its gate and up). Where all
    are int4 ``QuantizedLinear``s on the lowbit kernel, x is rounded to 8 bits once and one kernel call computes
    them all, and one more their LoRA updates (the same bits as one call each); otherwise they run one by one."""
    fused = len(layers) > 1 and all(
        isinstance(m, QuantizedLinear) and m.bits == "int4" and m.quantized.layout == "lowbit" for m in layers
    )
    if not fused or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return [layer(x) for layer in layers]
    rows = x.reshape(-1, x.shape[-1])
    weights = [(m.quantized.codes, m.quantized.scales, m.quantized.mins) for m in layers]
    products = int4_matmul_many(rows, weights)
    return _finish(layers, [y.reshape(*x.shape[:-1], -1) for y in products], x)


def _finish(layers: Sequence[QuantizedLinear], ys: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's product ``ys[i]`` with its bias and LoRA updates of ``x`` added: the updates of all the layers
    in one ``lora_add_many_`` call."""
    ys = [y if m.bias is None else y + m.bias for m, y in zip(layers, ys, strict=True)]
    updates = [[update.pair for update in m.lora] for m in layers]
    if any(updates):
        lora_add_many_(ys, x, updates)
    return ys


def quantize_model(model: nn.Module, weights: str, lm_head: nn.Module | None = None) -> nn.Module:
    """``model`` (a transformers causal LM, or a ``PeftModel`` of one with LoRA adapters on linear layers) with
    every ``nn.Linear`` replaced by a ``QuantizedLinear`` in ``weights``, in place; ``lm_head`` (the output
    layer) in int8 with its weight kept. A ``PeftModel``'s active adapters become the layers' unmerged
    updates and the plain model is returned."""
    _check_width(weights)  # before any layer changes
    if isinstance(model, PeftModel):
        _replace_lora_layers(model, weights)
        model = model.get_base_model()
    _replace_linears(model, weights, lm_head)
    return model


def _replace_lora_layers(module: nn.Module, weights: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, LoraLayer):
            setattr(module, name, QuantizedLinear(child.get_base_layer(), weights, _lora_updates(child)))
        else:
            _replace_lora_layers(child, weights)


def _lora_updates(layer: LoraLayer) -> tuple[LoraUpdate, ...]:
    """The active adapters of a peft LoRA layer as ``LoraUpdate``s; other kinds of layer are refused."""
    if not isinstance(layer, LoraLinear) or type(layer.get_base_layer()) is not nn.Linear:
        raise ValueError(
            f"quantized weights take LoRA on nn.Linear layers only, not {type(layer).__name__} "
            f"over {type(layer.get_base_layer()).__name__}"
        )
    if layer.merged:
        raise ValueError(
            "quantized weights need the LoRA unmerged: this layer's adapter is merged into its weight"
        )
    updates = []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}) or layer.fan_in_fan_out:
            raise ValueError(
                f"adapter {adapter!r}: quantized weights take plain LoRA (no DoRA or fan-in-fan-out)"
            )
        if layer.lora_B[adapter].bias is not None:
            raise ValueError(f"adapter {adapter!r}: quantized weights take LoRA without a bias")
        dtype = layer.get_base_layer().weight.dtype  # the activations' (peft may keep adapters in fp32)
        a, b = (
            layer.lora_A[adapter].weight.detach().to(dtype),
            layer.lora_B[adapter].weight.detach().to(dtype),
        )
        updates.append(LoraUpdate(a, b, float(layer.scaling[adapter])))
    return tuple(updates)


def _replace_linears(module: nn.Module, weights: str, lm_head: nn.Module | None) -> None:
    for name, child in list(module.named_children()):
        if child is lm_head and type(child) is nn.Linear:
            setattr(module, name, QuantizedLinear(child, "int8", keep_weight=True))
        elif type(child) is nn.Linear:
            setattr(module, name, QuantizedLinear(child, weights))
        else:
            _replace_linears(child, weights, lm_head)


def _check_width(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
