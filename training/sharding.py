"""FSDP2 over the training processes: every decoder layer sharded on its own, the rest of the model (embeddings,
final norm, LM head, Medusa heads) as the root, the training objective.

Selected by ``fsdp: true`` or by ``accelerate launch --use_fsdp --fsdp_version 2``; accelerate itself shards only
on GPUs, so the trainer shards in both cases, the same way on CPUs (gloo) and GPUs. Work outside the training
loss (calibration, the heads replay) runs through ``MedusaObjective.run``, registered as a forward of the root:
its parameters are gathered for it, each layer's as the layer runs, and the heads' gradients of a replay step are
reduced into their shards as a training step's are. Checkpoints and the final model gather the trained tensors
whole (``full_tensor``) and are written as without sharding, so a sharded run resumes on any number of processes.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from medusa_lora.errors import ConfigError
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.config import TrainConfig
from medusa_lora.training.losses import MedusaObjective

logger = logging.getLogger(__name__)


def wants_fsdp(cfg: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether to shard: ``cfg.fsdp`` or accelerate's ``--use_fsdp`` (which must ask for FSDP2), with several
    processes. Every process loads the base before sharding: accelerate's ``cpu_ram_efficient_loading`` (on by
    default), which leaves the other processes' weights empty for accelerate's own sharding to fill, is turned
    off here, before the base is loaded."""
    from_accelerate = _env_flag("ACCELERATE_USE_FSDP")
    if not (cfg.fsdp or from_accelerate):
        return False
    if cfg.load_in_4bit:
        raise ConfigError(
            "FSDP shards a 16/32-bit base; a 4-bit one (load_in_4bit) is not sharded: train QLoRA without FSDP"
        )
    if accelerator.num_processes == 1:
        logger.info("FSDP with one process: nothing to shard over, the model stays whole")
        return False
    if from_accelerate and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP needs fsdp_version 2 (accelerate launch --use_fsdp --fsdp_version 2 ...)")
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        logger.warning("FSDP: every process loads the base (fsdp_cpu_ram_efficient_loading is not used)")
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    return True


def accelerate_shards(accelerator: Accelerator) -> bool:
    """Whether accelerate is in FSDP mode (``--use_fsdp`` on GPUs): ``prepare`` then takes the sharded objective
    with the optimizer (and leaves it as it is); otherwise the sharded objective is not prepared (accelerate
    would wrap it in DDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def shard(objective: MedusaObjective) -> None:
    """Shard ``objective`` in place: each decoder layer, then the objective itself as the root, with ``run`` as
    a forward. Frozen and trained parameters shard alike; each process keeps 1/N of every one."""
    for layer in objective.model.decoder.layers:
        fully_shard(layer)
    fully_shard(objective)
    register_fsdp_forward_method(objective, "run")


def release(objective: MedusaObjective) -> None:
    """Free the root's gathered parameters after a ``run`` without backward (FSDP keeps the root's gathered after
    a forward, for the backward it expects), so that the module's parameters are the shards again."""
    if isinstance(objective, FSDPModule):
        objective.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a shard is gathered from every process (all of them must call this, in the same
    order); any other tensor is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` (every process has it) laid out as ``param``: this process's shard of it when ``param`` is
    sharded, else ``whole`` itself."""
    if not isinstance(param, DTensor):
        return whole
    whole = whole.to(device=param.device)
    return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)


def saved_state(model: MedusaLoraModel) -> dict[str, torch.Tensor]:
    """What ``save_pretrained`` writes, whole and on the CPU: the heads' state and the LoRA's tensors (every
    process calls this; a frozen base is not gathered)."""
    return {
        name: full_tensor(value).detach().cpu()
        for name, value in model.state_dict().items()
        if name.startswith("heads.") or "lora_" in name
    }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")
