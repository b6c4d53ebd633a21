"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

``output_dir/checkpoints/step-N/`` holds ``trainable.safetensors`` (the trained parameters),
``optimizer.safetensors`` + ``optimizer.json`` (state tensors; param groups and scalars),
``scheduler.json``, ``trainer_state.json`` (step, epoch, position in the epoch, config) and
``rng-<process>.safetensors`` (each process's torch RNG) and, with heads replay,
``replay-<process>.safetensors`` (each process's cached head inputs). A checkpoint is written to a temporary
sibling and renamed into place, so ``step-N`` is always complete. Sharded tensors (FSDP) are gathered whole
before they are written and laid out as the running processes shard them when read, so the files are the same
however many processes wrote or read them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from medusa_lora.atomic import replace_directory
from medusa_lora.errors import CheckpointError
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.config import TrainConfig
from medusa_lora.training.replay import ReplayCache
from medusa_lora.training.sharding import full_tensor, like

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    """Where training is: optimizer steps done, the epoch, and micro-batches of it consumed per process."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    num_processes: int = 1
    best_held_out: float | None = None  # early stopping: the best held-out score so far
    evals_without_improvement: int = 0


def trainable_state(model: MedusaLoraModel) -> dict[str, torch.Tensor]:
    """The trained parameters, whole and on the CPU (under FSDP every process must call this)."""
    return {
        n: full_tensor(p).detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    model: MedusaLoraModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    cfg: TrainConfig,
    replay: ReplayCache | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (all processes call this) and keep the newest few."""
    root = output_dir / CHECKPOINTS
    staging = root / f".step-{state.step}.tmp"
    final = root / f"step-{state.step}"
    trainable = trainable_state(model)
    tensors, meta = _split_optimizer_state(optimizer.state_dict())
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(trainable, staging / "trainable.safetensors")
        save_file(tensors, staging / "optimizer.safetensors")
        _write_json(staging / "optimizer.json", meta)
        _write_json(staging / "scheduler.json", scheduler.state_dict())
        _write_json(staging / "trainer_state.json", {**asdict(state), "config": cfg.to_dict()})
    accelerator.wait_for_everyone()
    save_file(_rng_state(), staging / f"rng-{accelerator.process_index}.safetensors")
    if replay is not None:
        save_file(replay.state_dict(), staging / f"replay-{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(staging, final)
        for old in list_checkpoints(output_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(
    path: Path,
    model: MedusaLoraModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    process_index: int,
    cfg: TrainConfig,
    replay: ReplayCache | None = None,
) -> TrainState:
    """Restore weights, optimizer, scheduler, this process's RNG and replay cache; return where training
    stopped."""
    load_trainable(path, model)
    try:
        tensors = load_file(path / "optimizer.safetensors")
        meta = json.loads((path / "optimizer.json").read_text())
        scheduler_state = json.loads((path / "scheduler.json").read_text())
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {exc}") from exc
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict(_join_optimizer_state(tensors, meta, params))
    scheduler.load_state_dict(scheduler_state)
    changed = sorted(k for k, v in trainer_state.pop("config").items() if getattr(cfg, k, None) != v)
    if changed:
        logger.warning("resuming %s with changed settings: %s", path, changed)
    rng = path / f"rng-{process_index}.safetensors"
    if rng.is_file():
        _set_rng_state(load_file(rng))
    cached = path / f"replay-{process_index}.safetensors"
    if replay is not None and cached.is_file():
        replay.load_state_dict(load_file(cached), model.device)
    elif replay is not None:
        logger.warning("%s holds no replay cache: the heads replay only the steps from here on", path)
    state = TrainState(**trainer_state)
    logger.info("resumed from %s (step %d, epoch %d)", path, state.step, state.epoch)
    return state


def load_trainable(path: Path, model: MedusaLoraModel) -> None:
    """Copy checkpoint ``path``'s trained parameters into ``model``, which must train the same ones."""
    try:
        saved = load_file(path / "trainable.safetensors")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {exc}") from exc
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        raise CheckpointError(
            f"checkpoint {path} holds other trainable parameters than this run "
            f"(missing {sorted(set(params) - set(saved))[:5]}, "
            f"unexpected {sorted(set(saved) - set(params))[:5]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(like(param, saved[name]))


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{"<param>.<key>": tensor}`` (whole) and the JSON-able rest (param groups, non-tensor state)."""
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = full_tensor(value).detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], params: list[torch.Tensor]
) -> dict[str, Any]:
    """The optimizer's state dict; a state tensor shaped as its parameter (AdamW's moments) is laid out as the
    parameter is (a shard of it under FSDP)."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        param = params[int(index)]
        state.setdefault(int(index), {})[key] = like(param, tensor) if tensor.shape == param.shape else tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
