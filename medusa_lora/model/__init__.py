"""The task model: a causal LM, its LoRA and its Medusa heads (``wrapper``), the heads (``heads``) and their
config (``config``), loading a base (``base``, ``demo``), and getting it ready to generate (``inference``).

``MedusaLoraModel`` loads on first use, so the heads and their config import without peft (vLLM's
environment, ``serving.vllm_plugin``)."""

from __future__ import annotations

__all__ = ["MedusaLoraModel"]


def __getattr__(name: str):
    if name == "MedusaLoraModel":
        from medusa_lora.model.wrapper import MedusaLoraModel

        return MedusaLoraModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
