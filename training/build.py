"""The model to train: base + (LoRA) + fresh Medusa heads, with exactly the mode's parameters trainable."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from torch import nn

from medusa_lora.errors import ConfigError
from medusa_lora.model.base import load_base_model, load_tokenizer
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.qlora import four_bit_record, load_4bit_base
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.config import TrainConfig


def build_model(cfg: TrainConfig) -> MedusaLoraModel:
    """Fresh heads (and LoRA) on ``cfg.model``; ``heads`` mode freezes the base, ``lora`` the heads.

    The base is loaded in ``cfg.base_dtype``; what trains (LoRA, heads) is float32 either way (PEFT keeps
    adapters on a bf16 base in float32). With ``load_in_4bit`` the base's linear layers are 4-bit (QLoRA),
    quantized from ``base_dtype`` weights: the heads then learn its hidden states."""
    name = str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model
    dtype = getattr(torch, cfg.base_dtype)
    if cfg.load_in_4bit:
        record = four_bit_record(
            cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant, cfg.bnb_4bit_compute_dtype, dtype
        )
        # peft's preparation: the base frozen, its other weights in fp32 (checkpointing is enabled below)
        base = prepare_model_for_kbit_training(
            load_4bit_base(name, record, torch.float32), use_gradient_checkpointing=False
        )
    else:
        base = load_base_model(name, dtype)
    base.config.use_cache = False
    lora = lora_config(cfg, base.config.num_hidden_layers) if cfg.trains_lora else None
    model = MedusaLoraModel.from_base(
        base,
        heads_config(cfg),
        lora,
    )
    model.tokenizer = load_tokenizer(name)
    model.heads.float()
    model.base.requires_grad_(False)
    if lora is not None:
        for param_name, param in model.base.named_parameters():
            param.requires_grad_("lora_" in param_name)
    model.heads.requires_grad_(cfg.trains_heads)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model.causal_lm)
    return model.train()


def heads_config(cfg: TrainConfig, **dims: int) -> MedusaConfig:
    """The heads ``cfg`` trains; ``dims`` (hidden_size, vocab_size) where no base fills them in."""
    return MedusaConfig(
        num_heads=cfg.num_heads,
        num_layers=cfg.num_head_layers,
        root_conditioned=cfg.root_conditioned_heads,
        path_conditioned=cfg.path_conditioned_heads,
        **dims,
    )


def _enable_checkpointing(causal_lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing, under its transformers name (``gradient_checkpointing`` before
    the 5.2x rename)."""
    if hasattr(causal_lm, "activation_checkpointing_enable"):
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_config(cfg: TrainConfig, num_layers: int) -> LoraConfig:
    layers = None
    if cfg.lora_last_layers is not None:
        if not 1 <= cfg.lora_last_layers <= num_layers:
            raise ConfigError(f"lora_last_layers must be in [1, {num_layers}], got {cfg.lora_last_layers}")
        layers = list(range(num_layers - cfg.lora_last_layers, num_layers))
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def param_groups(model: MedusaLoraModel, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups ``lora`` and ``heads`` (each only when trained), with their own learning rates."""
    groups = [
        {
            "name": "lora",
            "lr": cfg.lr_lora,
            "params": [p for p in model.base.parameters() if p.requires_grad],
        },
        {
            "name": "heads",
            "lr": cfg.lr_heads,
            "params": [p for p in model.heads.parameters() if p.requires_grad],
        },
    ]
    return [dict(g, weight_decay=cfg.weight_decay) for g in groups if g["params"]]
