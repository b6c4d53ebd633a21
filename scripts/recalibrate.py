"""Re-run the calibration of a trained adapter with the current rule (a script, not a test): after a change to
``training/calibrate.py``, so adapters trained before it compare with new ones on equal terms.

    python scripts/recalibrate.py runs/v-root runs/v-path            # print only
    python scripts/recalibrate.py runs/v-root --write                # also replace the calibration

Each argument is a training output directory (``config.yaml`` and ``model/``); the held-out examples, the
tree size and the batch size are that run's. Prints the hit rates (given the heads before right, and
everywhere) and the tokens per step of calibrated trees, walked over the held-out completions as generation goes
(what ``predicted_tokens_per_step`` now reports) and as the hit rates' expectation (what it reported before the
walk). With ``--write`` the tree, hit rates and greedy ranks in ``model/medusa_config.json`` and
``model/calibration.json`` are replaced (each file atomically, as training writes them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.training.calibrate import CALIBRATION_FILE, calibrate
from medusa_lora.training.config import load_config
from medusa_lora.training.data import load_training_data
from medusa_lora.trees.tree import calibrated_tree
from medusa_lora.trees.walk import expected_accepted_length, walked_accepted_length

SIZES = (4, 6, 8, 12, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="training output dirs (config.yaml, model/)")
    parser.add_argument("--write", action="store_true", help="replace the model's calibration")
    args = parser.parse_args()
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        model = MedusaLoraModel.from_pretrained(cfg.model, run / "model")
        data = load_training_data(cfg, model.tokenizer)
        held_out = data.validation.select(range(min(cfg.calibration_samples, len(data.validation))))
        result = calibrate(model, held_out, data.collator, cfg.eval_batch_size, cfg.tree_size)
        print(f"{run}: top-1 given the heads before right {[round(r[0], 3) for r in result.hit_rates]}")
        print(f"{' ' * len(str(run))}  top-1 everywhere {[round(r, 3) for r in result.head_top1]}")
        for size in SIZES:
            tree = calibrated_tree(result.hit_rates, size)
            walked = walked_accepted_length(tree, result.greedy_ranks)
            expected = expected_accepted_length(tree, result.hit_rates)
            print(
                f"  {size:2d} nodes: {walked:.2f} tokens/step walked, {expected:.2f} by the hit rates' expectation"
            )
        if args.write:
            config = MedusaConfig.load(run / "model")
            config.tree, config.hit_rates = result.tree, result.hit_rates
            config.greedy_ranks = result.greedy_ranks
            config.save(run / "model")
            result.save(run / "model" / CALIBRATION_FILE)
            print(f"  wrote {run / 'model'}")


if __name__ == "__main__":
    main()
