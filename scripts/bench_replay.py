"""Compare heads-replay settings on one trained run (a script, not a test), from its last checkpoint.

    medusa-lora train --config training/configs/cpu-task.yaml --set output_dir=runs/v-replay --set save_every=60
    python scripts/bench_replay.py runs/v-replay 0 1 2 3 --lr 3e-3          # passes over the whole cache
    python scripts/bench_replay.py runs/v-replay 2 --last-steps 60           # only the last 60 steps' inputs

The run must have trained with ``heads_replay_epochs`` > 0 and written a checkpoint at its last step (so the
checkpoint holds the weights before the replay and every step's cached inputs). For each number of passes
(0: no replay) the heads are reset to the checkpoint's, replayed, and measured on the run's held-out examples:
head top-1 against the model's greedy tokens, and the tokens per step of calibrated trees walked over the
held-out completions (what ``tree="auto"`` and the eval's "predicted" column use), with the replay's time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

from safetensors.torch import load_file

from medusa_lora.training.build import build_model
from medusa_lora.training.calibrate import calibrate
from medusa_lora.training.checkpoint import list_checkpoints, load_trainable
from medusa_lora.training.config import load_config
from medusa_lora.training.data import load_training_data
from medusa_lora.training.draft_vocab import frequent_label_tokens
from medusa_lora.training.replay import ReplayCache, replay_heads
from medusa_lora.trees.tree import calibrated_tree
from medusa_lora.trees.walk import walked_accepted_length

SIZES = (8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training output dir (config.yaml, checkpoints/)")
    parser.add_argument("passes", type=float, nargs="+", help="replay passes to compare (0: none)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the run's lr_heads_replay)")
    parser.add_argument("--last-steps", type=int, default=0, help="replay only the last N steps' inputs")
    parser.add_argument("--batch-size", type=int, help="positions per replay step (default: the run's)")
    parser.add_argument("--weight-decay", type=float, help="AdamW's weight decay (default: the run's)")
    args = parser.parse_args()
    cfg = load_config(args.run / "config.yaml")
    checkpoint = list_checkpoints(args.run)[-1]
    model = build_model(cfg)
    data = load_training_data(cfg, model.tokenizer)
    if cfg.draft_vocab_size:
        model.set_draft_vocab(
            frequent_label_tokens(data.train, cfg.draft_vocab_size, model.config.vocab_size)
        )
    load_trainable(checkpoint, model)
    cache = ReplayCache(window=0)
    cache.load_state_dict(load_file(checkpoint / "replay-0.safetensors"), model.device)
    inputs, steps = cache.joined()
    if args.last_steps:
        kept = steps > steps.max() - args.last_steps
        inputs = inputs.map(lambda x: x[kept])
    held_out = data.validation.select(range(min(cfg.calibration_samples, len(data.validation))))
    start = copy.deepcopy(model.heads.state_dict())
    print(f"{checkpoint}: {inputs.targets.shape[0]} cached positions; held-out: {len(held_out)} examples")
    print(
        f"{'passes':>6} {'lr':>7} {'replay s':>8}  head top-1 (greedy targets)   walked tokens/step: "
        + "  ".join(f"{n} nodes" for n in SIZES)
    )
    for passes in args.passes:
        replay_cfg = dataclasses.replace(
            cfg,
            heads_replay_epochs=passes,
            lr_heads_replay=args.lr or cfg.lr_heads_replay,
            heads_replay_batch_size=args.batch_size or cfg.heads_replay_batch_size,
            weight_decay=cfg.weight_decay if args.weight_decay is None else args.weight_decay,
        )
        model.heads.load_state_dict(start)
        began = time.perf_counter()
        if passes:
            replay_heads(model, inputs, replay_cfg, show_progress=False)
        seconds = time.perf_counter() - began
        result = calibrate(model, held_out, data.collator, cfg.eval_batch_size, cfg.tree_size)
        walks = [
            walked_accepted_length(calibrated_tree(result.hit_rates, n), result.greedy_ranks) for n in SIZES
        ]
        print(
            f"{passes:>6g} {replay_cfg.lr_heads_replay:>7g} {seconds:>8.0f}  "
            + " ".join(f"{x:.3f}" for x in result.head_top1)
            + "   "
            + "  ".join(f"{w:7.2f}" for w in walks)
        )


if __name__ == "__main__":
    main()
