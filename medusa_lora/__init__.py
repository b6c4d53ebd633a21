"""medusa-lora: Medusa heads trained jointly with a task LoRA for lossless speculative decoding.

The public API, as with peft: ``from medusa_lora import MedusaLoraModel, MedusaConfig, generate, for_inference``
(and ``train``, ``TrainConfig``, ``load_config`` for training). Names load on first use, so the CLI starts fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "MedusaLoraModel": "medusa_lora.model.wrapper",
    "MedusaConfig": "medusa_lora.model.config",
    "MedusaHeads": "medusa_lora.model.heads",
    "for_inference": "medusa_lora.model.inference",
    "generate": "medusa_lora.decoding",
    "GenerationOutput": "medusa_lora.decoding",
    "GenerationStats": "medusa_lora.decoding",
    "TokenTree": "medusa_lora.trees.tree",
    "choose_tree": "medusa_lora.trees.choice",
    "Drafter": "medusa_lora.drafting.drafter",
    "HeadDrafter": "medusa_lora.drafting.heads",
    "SuffixDrafter": "medusa_lora.drafting.suffix",
    "HybridDrafter": "medusa_lora.drafting.hybrid",
    "PromptFormat": "medusa_lora.prompting",
    "TrainConfig": "medusa_lora.training.config",
    "load_config": "medusa_lora.training.config",
    "train": "medusa_lora.training.loop",
}
__all__ = [
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "HeadDrafter",
    "HybridDrafter",
    "MedusaConfig",
    "MedusaHeads",
    "MedusaLoraModel",
    "PromptFormat",
    "SuffixDrafter",
    "TokenTree",
    "TrainConfig",
    "choose_tree",
    "for_inference",
    "generate",
    "load_config",
    "train",
]

# modules of the flat layout before 0.2 -> where their contents live now
MOVED = {
    "medusa_lora.attention": "medusa_lora.verification.attention",
    "medusa_lora.base_model": "medusa_lora.model.base",
    "medusa_lora.config": "medusa_lora.model.config",
    "medusa_lora.demo_model": "medusa_lora.model.demo",
    "medusa_lora.drafting": "medusa_lora.drafting.heads, .suffix and .hybrid",
    "medusa_lora.export": "medusa_lora.formats.export",
    "medusa_lora.generation": "medusa_lora.decoding (generate) and medusa_lora.generation (its steps)",
    "medusa_lora.heads": "medusa_lora.model.heads",
    "medusa_lora.import_heads": "medusa_lora.formats.import_heads",
    "medusa_lora.inference": "medusa_lora.model.inference",
    "medusa_lora.kv_cache": "medusa_lora.verification.kv_cache",
    "medusa_lora.serving_formats": "medusa_lora.formats.layouts",
    "medusa_lora.suffix": "medusa_lora.drafting.suffix",
    "medusa_lora.tree": "medusa_lora.trees.tree and medusa_lora.trees.walk",
    "medusa_lora.tree_choice": "medusa_lora.trees.choice",
    "medusa_lora.tree_tuning": "medusa_lora.trees.tuning",
    "medusa_lora.training.cli": "medusa_lora.cli.train",
    "medusa_lora.verify": "medusa_lora.verification.verify",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medusa_lora' has no attribute {name!r}")


class _MovedModules(importlib.abc.MetaPathFinder):
    """Imports of a module that moved fail with a message naming where it went (after the real finders: a
    module that exists under an old name, such as ``medusa_lora.drafting``, imports as usual)."""

    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED:
            raise ModuleNotFoundError(
                f"{fullname} moved to {MOVED[fullname]}; the public API is importable from medusa_lora "
                f"(e.g. from medusa_lora import MedusaLoraModel, MedusaConfig, generate, for_inference)",
                name=fullname,
            )


sys.meta_path.append(_MovedModules())
