"""The task model: a causal LM, its LoRA and its Medusa heads (``wrapper``), the heads (``heads``) and their
config (``config``), loading a base (``base``, ``demo``), and getting it ready to generate (``inference``)."""

from medusa_lora.model.wrapper import MedusaLoraModel

__all__ = ["MedusaLoraModel"]
