"""Getting a trained model ready to generate: the LoRA merged into the base (a 4-bit QLoRA base dequantized
first: ``model.qlora``; or, on int8 / int4 weights, kept beside them: ``model.quantize``), the heads in fp16, and
on a CPU every float linear layer's weight pre-packed for oneDNN.

Why pre-pack: at batch 1 a CPU decode step is a few matrix products with 1 to ~16 rows, which PyTorch's
default CPU GEMM handles poorly; oneDNN's blocked weight layout (what ``torch.compile``'s CPU freezing pass
uses, op ``mkldnn._linear_pointwise``) makes both the 1-token and the tree forward cheaper
(docs/benchmarks.md, ``python scripts/bench_prepack.py``). Every row of a comparison uses the same prepared
model: the plain-decoding baseline gets faster too.
"""

from __future__ import annotations

import atexit
import gc
import logging

import torch
from torch import nn

from medusa_lora.kernels._cpu import extension as cpu_extension
from medusa_lora.model.qlora import is_4bit, merge_into_base
from medusa_lora.model.quantize import QuantizedLinear, quantize_model
from medusa_lora.model.wrapper import MedusaLoraModel

logger = logging.getLogger(__name__)


def prepack_supported(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be pre-packed here: a CPU tensor in fp32 (or bf16 on a CPU with native bf16)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is also held pre-packed for oneDNN.

    ``weight`` and ``bias`` stay the original tensors (readable, e.g. tied embeddings or Medusa heads that
    project through the LM head); ``forward`` uses the packed copy, made once here. Changing ``weight``
    afterwards does not change the packed copy, so pack only a model whose weights are final.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            raise RuntimeError(
                "PackedLinear is for inference: it has no backward (use torch.inference_mode())"
            )
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def prepack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` whose weight ``prepack_supported`` by a ``PackedLinear``,
    in place; returns how many were replaced (0 off CPU)."""
    replaced = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and prepack_supported(child.weight):
            setattr(module, name, PackedLinear(child))
            replaced += 1
        else:
            replaced += prepack_linears(child)
    return replaced


def for_inference(
    model: MedusaLoraModel,
    prepack: bool = True,
    draft_dtype: torch.dtype | None = torch.float16,
    weights: str | None = None,
    merge: bool = True,
) -> MedusaLoraModel:
    """``model`` ready to generate: its LoRA merged into the base weights (``qlora.merge_into_base``: peft's
    ``merge_and_unload``, or on a 4-bit QLoRA base into its weights dequantized as training computed with them),
    its heads in ``draft_dtype`` where that is narrower than theirs, and, with ``prepack`` on a CPU, its decoder,
    LM head and heads pre-packed (``prepack_linears``). ``merge=False`` keeps the LoRA unmerged beside the base's
    layers: on a QLoRA model, the 4-bit base as trained.

    ``weights="int8"`` or ``"int4"``: the decoder's linear layers on weights of that width, the LM head in int8,
    the LoRA unmerged beside them (``quantize_model``); activations stay in the model's dtype. None: the
    model's own weights.

    The heads only draft: the model verifies every draft in its own dtype, so a narrower dtype leaves the
    output as it is and halves the bytes a draft reads. fp16 rather than bf16: its 10 mantissa bits keep the
    fp32 heads' drafts, and the heads read post-norm hidden states, well inside its range (docs/decisions.md).
    ``draft_dtype=None`` keeps the model's dtype.

    Greedy outputs are unchanged up to floating-point rounding. ``model``'s modules are reused, not copied:
    use the returned model from now on, not ``model``.
    """
    if model.device.type == "cpu":
        cpu_extension()  # built (or loaded from its cache) now, not inside the first timed generate()
    if weights is not None:
        if is_4bit(model.causal_lm):
            raise ValueError(
                f"this model's base is already 4-bit (bitsandbytes, QLoRA): serve it with merge=False, or merged "
                f"(weights=None), not on {weights} weights"
            )
        base = quantize_model(model.base, weights, lm_head=model.lm_head)  # refuses unknown widths
        on_aten = any(isinstance(m, QuantizedLinear) and m.quantized.layout == "aten" for m in base.modules())
        if model.dtype == torch.float32 and on_aten:
            logger.warning(
                "%s weights under fp32 activations run torch's scalar CPU kernels here (the CPU extension is "
                "off or did not build), several times slower than the fp32 model: use a bf16 model "
                "(docs/decisions.md, low-bit weights)",
                weights,
            )
    elif merge:
        base = merge_into_base(model.base)
    else:
        base = model.base
    base.eval()
    heads = model.heads
    heads_dtype = None if heads is None else heads.dtype  # None too for heads without weights of their own
    if draft_dtype is not None and heads_dtype is not None and draft_dtype.itemsize < heads_dtype.itemsize:
        heads.to(draft_dtype)
    if prepack:
        prepack_linears(base)
    if heads is not None:
        heads.eval()
        if prepack:
            prepack_linears(heads)
    return MedusaLoraModel(base, heads, model.config, model.tokenizer)


def freeze_gc() -> None:
    """Collect once, then move every object alive (the model, the imported libraries) out of the cyclic
    garbage collector's reach, as a long-running generation process should after loading (vLLM does too).

    A full collection walks every tracked object (hundreds of thousands with transformers, datasets and a model
    loaded): a pause that lands inside some generation step and charges whichever row or request allocates then.
    """
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # let interpreter shutdown collect them (else extensions report leaks)
