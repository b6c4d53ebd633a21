"""``train(cfg)``: the accelerate training loop, checkpoints, calibration and the final model.

Output layout (``output_dir``): ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``checkpoints/step-N/`` (resumable, see ``checkpoint.py``) and ``model/``: a ``MedusaLoraModel``
directory (adapter, heads, ``medusa_config.json`` with the calibrated tree) plus ``calibration.json``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, set_seed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from medusa_lora.errors import ConfigError
from medusa_lora.training.build import build_model, param_groups
from medusa_lora.training.calibrate import CALIBRATION_FILE, Calibration, calibrate
from medusa_lora.training.checkpoint import (
    CHECKPOINTS,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from medusa_lora.training.config import TrainConfig
from medusa_lora.training.data import LengthGroupedBatches, load_training_data
from medusa_lora.training.draft_vocab import frequent_label_tokens
from medusa_lora.training.losses import MedusaObjective, head_weight, total_loss
from medusa_lora.training.memory import estimate_memory
from medusa_lora.training.metrics import METRICS_FILE, MetricsLogger, summary
from medusa_lora.training.replay import ReplayCache, gather, replay_heads
from medusa_lora.training.sharding import accelerate_shards, release, saved_state, shard, wants_fsdp

logger = logging.getLogger(__name__)

MODEL_DIR = "model"


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train as ``cfg`` says and return the saved model directory (``output_dir/model``).

    With ``resume``, continue from the newest checkpoint in ``output_dir`` (same data order, optimizer
    and RNG state); without one, start afresh.
    """
    trainer = Trainer(cfg, resume)
    trainer.fit()
    trainer.replay_heads()
    return trainer.finish()


class Trainer:
    """One run: model, data, optimizer and schedule from ``cfg``, restored from a checkpoint if resuming."""

    def __init__(self, cfg: TrainConfig, resume: bool) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "no"
        tensorboard = is_tensorboard_available()
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets torchrun run several CPU processes (gloo)
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=precision,
            log_with="tensorboard" if tensorboard else None,
            project_dir=str(self.output_dir),
        )
        _prepare_output_dir(self.output_dir, cfg, resume, self.accelerator)
        self.fsdp = wants_fsdp(cfg, self.accelerator)
        set_seed(cfg.seed)
        self.model = build_model(cfg)
        with self.accelerator.main_process_first():
            self.data = load_training_data(cfg, self.model.tokenizer)
        if cfg.draft_vocab_size and cfg.trains_heads:  # deterministic from the data, so resume agrees
            vocab = frequent_label_tokens(self.data.train, cfg.draft_vocab_size, self.model.config.vocab_size)
            self.model.set_draft_vocab(vocab)
            logger.info("draft vocabulary: %d tokens", vocab.numel())
        self.replay = ReplayCache(cfg.heads_replay_steps) if cfg.heads_replay_epochs else None
        objective = MedusaObjective(self.model, cfg)
        if self.fsdp:
            shard(objective)  # before the optimizer, which then holds the shards
            logger.info("FSDP: the model sharded over %d processes", self.accelerator.num_processes)
        optimizer = torch.optim.AdamW(param_groups(self.model, cfg))
        self.batches_per_epoch = len(self.epoch_loader(0))
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
        # Not prepared by accelerate, which would step it once per process: it counts optimizer steps.
        self.scheduler = get_cosine_schedule_with_warmup(
            optimizer, round(cfg.warmup_ratio * self.total_steps), self.total_steps
        )
        self.state = (
            self._restore(optimizer) if resume else TrainState(num_processes=self.accelerator.num_processes)
        )
        self.runner = objective  # what ``run`` is called on: under DDP the module inside the wrapper
        if self.fsdp and not accelerate_shards(self.accelerator):
            self.objective, self.optimizer = objective, self.accelerator.prepare(optimizer)
        else:
            self.objective, self.optimizer = self.accelerator.prepare(objective, optimizer)
        num_heads = self.model.heads.num_heads if cfg.trains_heads else 0
        self.metrics = MetricsLogger(
            self.accelerator, self.output_dir, num_heads, cfg.trains_lora, self.state.step
        )
        if tensorboard:
            self.accelerator.init_trackers("tensorboard")

    def _restore(self, optimizer: torch.optim.Optimizer) -> TrainState:
        processes = self.accelerator.num_processes
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            logger.info("no checkpoint in %s: starting afresh", self.output_dir / CHECKPOINTS)
            return TrainState(num_processes=processes)
        state = load_checkpoint(
            checkpoints[-1],
            self.model,
            optimizer,
            self.scheduler,
            self.accelerator.process_index,
            self.cfg,
            self.replay,
        )
        if state.num_processes != processes:
            logger.warning(
                "the checkpoint ran on %d processes, this run on %d: the data order differs",
                state.num_processes,
                processes,
            )
            state.num_processes = processes
        return state

    def epoch_loader(self, epoch: int) -> DataLoader:
        """The epoch's batches: a shuffle seeded by ``seed + epoch`` (a resumed run sees the same order), of
        examples of similar lengths with ``group_by_length``.

        The loader's own generator keeps its iterators from drawing on the global RNG (LoRA dropout's).
        """
        seed = self.cfg.seed + epoch
        generator = torch.Generator().manual_seed(seed)
        if self.cfg.group_by_length:
            lengths = [len(ids) for ids in self.data.train["input_ids"]]
            batches = LengthGroupedBatches(lengths, self.cfg.batch_size, seed)
            loader = DataLoader(
                self.data.train, batch_sampler=batches, collate_fn=self.data.collator, generator=generator
            )
        else:
            loader = DataLoader(
                self.data.train.shuffle(seed=seed),
                batch_size=self.cfg.batch_size,
                collate_fn=self.data.collator,
                generator=generator,
            )
        return self.accelerator.prepare_data_loader(loader)

    def fit(self) -> None:
        """Optimizer steps up to ``total_steps``; log every ``log_every``, checkpoint every ``save_every``."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        logger.info(
            "training %s: %d examples, %d optimizer steps of %d sequences",
            cfg.mode,
            len(self.data.train),
            self.total_steps,
            cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes,
        )
        if accelerator.is_main_process:
            estimate = estimate_memory(
                self.model.causal_lm.config,
                cfg,
                accelerator.mixed_precision,
                accelerator.num_processes,
                self.fsdp,
                math_attention=accelerator.device.type == "cpu",
            )
            accelerator.print(f"memory estimate: {estimate}")
        progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc=cfg.mode,
            disable=not accelerator.is_local_main_process,
        )
        self.objective.train()
        stop = False
        while state.step < self.total_steps and not stop:
            loader = self.epoch_loader(state.epoch)
            if state.batch_in_epoch:
                loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
            for batch in loader:
                state.batch_in_epoch += 1
                weight = head_weight(state.step, cfg)
                # the backward too: gradient checkpointing recomputes attention there
                with accelerator.accumulate(self.objective), training_attention(accelerator.device):
                    with accelerator.autocast():  # the sharded objective is not wrapped in it by accelerate
                        parts = self.objective(**batch)
                    if self.replay is not None:
                        self.replay.add(state.step, parts.head_inputs)
                    loss = total_loss(parts, weight, cfg)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                self.metrics.add(loss, parts)
                if not accelerator.sync_gradients:
                    continue
                lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}
                self.scheduler.step()
                state.step += 1
                progress.update(1)
                if state.step % cfg.log_every == 0 or state.step == self.total_steps:
                    epoch = round(state.epoch + state.batch_in_epoch / self.batches_per_epoch, 4)
                    record = self.metrics.flush(state.step, {"epoch": epoch, **lrs, "head_weight": weight})
                    progress.set_postfix_str(summary(record))
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < self.total_steps:
                    stop = self.evaluate()
                    if stop:
                        accelerator.print(
                            f"early stop at step {state.step}: held-out top-1 has not improved on "
                            f"{state.best_held_out:.4f} for {state.evals_without_improvement} evaluations"
                        )
                if cfg.save_every and (state.step % cfg.save_every == 0 or stop):
                    save_checkpoint(
                        accelerator,
                        self.output_dir,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        state,
                        cfg,
                        self.replay,
                    )
                if state.step >= self.total_steps or stop:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        progress.close()

    def replay_heads(self) -> None:
        """With ``heads_replay_epochs``, train the heads alone over the inputs cached in training (``replay.py``):
        every process gathers every process's cache and replays the same, so the heads stay identical."""
        if self.replay is None:
            return
        cached = self.replay.joined()
        if cached is None:
            logger.warning("heads replay: nothing was cached (no training steps ran in this process)")
            return
        inputs = gather(self.accelerator, *cached)
        self.accelerator.print(
            f"heads replay: {self.cfg.heads_replay_epochs:g} passes over {inputs.targets.shape[0]} positions"
        )
        records = replay_heads(
            self.model,
            inputs,
            self.cfg,
            self.accelerator.autocast,
            show_progress=self.accelerator.is_local_main_process,
            run=self.runner.run,
        )
        for record in records:
            self.metrics.write({"step": self.state.step, **record})

    def calibrate(self) -> Calibration:
        """Per-head hit rates (and LM top-1) on up to ``calibration_samples`` held-out examples."""
        held_out = self.data.validation
        held_out = held_out.select(range(min(self.cfg.calibration_samples, len(held_out))))
        result = self.runner.run(
            calibrate,
            self.model,
            held_out,
            self.data.collator,
            self.cfg.eval_batch_size,
            self.cfg.tree_size,
            self.accelerator.autocast,
        )
        release(self.runner)
        return result

    def evaluate(self) -> bool:
        """Log held-out top-1 now; True when ``early_stopping_patience`` evaluations in a row did not beat
        the best (the mean head top-1, or the LM's top-1 without heads). Every process computes the same
        figures from the same data, so all stop together."""
        result = self.calibrate()
        score = sum(result.head_top1) / len(result.head_top1) if self.cfg.trains_heads else result.lm_top1
        state = self.state
        if state.best_held_out is None or score > state.best_held_out:
            state.best_held_out, state.evals_without_improvement = score, 0
        else:
            state.evals_without_improvement += 1
        self.metrics.write(
            {
                "step": state.step,
                "split": "validation",
                "head_top1": result.head_top1,
                "lm_top1": result.lm_top1,
                "score": score,
            }
        )
        patience = self.cfg.early_stopping_patience
        return bool(patience) and state.evals_without_improvement >= patience

    def finish(self) -> Path:
        """Calibrate on held-out data, put the tree into the config, save ``output_dir/model``. Every process
        calibrates (under FSDP each holds a shard of the model) and gathers what is saved; the first saves it."""
        model_dir = self.output_dir / MODEL_DIR
        accelerator = self.accelerator
        result = self.calibrate()
        self.model.config.tree = result.tree
        self.model.config.hit_rates = result.hit_rates
        self.model.config.greedy_ranks = result.greedy_ranks
        state = saved_state(self.model)
        if accelerator.is_main_process:
            self.model.save_pretrained(model_dir, overwrite=True, state_dict=state)
            result.save(model_dir / CALIBRATION_FILE)
            self.metrics.write(
                {
                    "step": self.state.step,
                    "split": "validation",
                    "head_top1": result.head_top1,
                    "lm_top1": result.lm_top1,
                    "expected_accepted_length": result.expected_accepted_length,
                }
            )
            accelerator.print(
                f"held-out ({result.samples} examples): LM top-1 {result.lm_top1:.3f}; head top-1 "
                + " ".join(f"{acc:.3f}" for acc in result.head_top1)
                + f"; {result.tree_size}-node tree, expected accepted length "
                f"{result.expected_accepted_length:.2f}"
            )
            accelerator.print(f"model saved to {model_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return model_dir


def training_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention backend of training steps: on a CPU SDPA's math backend (torch's flash attention for CPU
    made a step 12% slower at the demo task's ~230 tokens, most of it in its backward: docs/training.md); on other
    devices torch's choice."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX). Without it torch emulates bf16 and
    bf16 autocast is several times slower than fp32 (docs/decisions.md)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _prepare_output_dir(output_dir: Path, cfg: TrainConfig, resume: bool, accelerator: Accelerator) -> None:
    """Never mix runs: an earlier one is continued (``resume``), replaced (``overwrite_output``) or kept."""
    earlier = [
        output_dir / name for name in (CHECKPOINTS, MODEL_DIR, METRICS_FILE) if (output_dir / name).exists()
    ]
    if earlier and not resume and not cfg.overwrite_output:
        raise ConfigError(
            f"{output_dir} holds an earlier run ({', '.join(p.name for p in earlier)}); pass --resume to "
            "continue it, set overwrite_output: true to replace it, or choose another output_dir"
        )
    if accelerator.is_main_process:
        if not resume:
            for path in earlier:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
