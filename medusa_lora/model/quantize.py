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
from types import ModuleType

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from medusa_lora.kernels._cpu import extension
from medusa_lora.kernels.lora_add import kernel_arguments, lora_add_many_, pack_b
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
        """(A, scaling B as panels), as ``lora_add_many_`` takes an update."""
        return self.a.contiguous(), pack_b(self.b * self.scaling)


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
        if self.bias is not None:
            y = y + self.bias
        if self.lora:
            lora_add_many_([y], x, [[update.pair for update in self.lora]])
        return y

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


class LinearGroup:
    """Layers that read the same x (a layer's q, k, v; its gate and up; or one layer) called as one: ``group(x)``
    is ``[layer(x) for layer in layers]`` bit for bit. Where all are ``QuantizedLinear``s of one width (int4 or
    int8) on the lowbit kernels with fp32 LoRA updates, the kernels' arguments are gathered once, here: a call
    quantizes x once, runs one matmul call for every product and one ``lora_add_`` call for every update. Why: at
    135M parameters the Python around a CPU step's ~150 kernel calls is a large share of the step
    (docs/fast-path.md). Otherwise, one by one."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = tuple(layers)
        self._kernels = _fusable(self.layers)
        if self._kernels is None:
            return
        self._int4 = self.layers[0].bits == "int4"
        parts = [(m.quantized.codes, m.quantized.scales) for m in self.layers]
        if self._int4:
            parts = [(*part, m.quantized.mins) for part, m in zip(parts, self.layers)]
        self._weights = [list(part) for part in zip(*parts)]  # codes, scales (, mins): a list each
        self._biases = [m.bias for m in self.layers]
        self._lora = kernel_arguments([[update.pair for update in m.lora] for m in self.layers])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        kernels = self._kernels
        if (
            kernels is None
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return [layer(x) for layer in self.layers]
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        matmul = kernels.int4_matmul if self._int4 else kernels.int8_matmul
        ys = matmul(rows, *self._weights)
        ys = [y if bias is None else y + bias for y, bias in zip(ys, self._biases)]
        if self._lora[0]:
            kernels.lora_add_(ys, rows, *self._lora)
        return [y.view(*x.shape[:-1], -1) for y in ys]

    def kernel_spec(self) -> tuple:
        """What the extension's ``DecoderLayers`` runs for this group: the kernels' arguments (codes, scales,
        mins (empty for int8), biases, then ``lora_add_``'s A list, panels and owners), or ``(self,)`` where it
        calls the group."""
        if self._kernels is None:
            return (self,)
        codes, scales, *mins = self._weights
        return (codes, scales, mins[0] if mins else [], self._biases, *self._lora)


def _fusable(layers: Sequence[nn.Module]) -> ModuleType | None:
    """The CPU extension where ``LinearGroup`` can call it for ``layers`` directly (None: it cannot)."""
    module = extension()
    if module is None or not all(
        isinstance(m, QuantizedLinear) and m.bits == layers[0].bits and m.quantized.layout == "lowbit"
        for m in layers
    ):
        return None
    tensors = [t for m in layers for update in m.lora for t in update.pair]
    tensors += [m.bias for m in layers if m.bias is not None]
    return module if all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) else None


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
