"""Re-run the calibration of a trained adapter with the current rule (a script, not a test): after a change to
``training/calibrate.py``, so adapters trained before it compare with new ones on equal terms.

    python scripts/recalibrate.py runs/v-root runs/v-path            # print only
    python scripts/recalibrate.py runs/v-root --write                # also replace the calibration

Each argument is a training output directory (``config.yaml`` and ``model/``); the held-out examples, the
tree size and the batch size are that run's. Prints the hit rates (given the heads before right, and
everywhere) and the predicted tokens per step of the old and the new calibrated trees. With ``--write`` the
tree and hit rates in ``model/medusa_config.json`` and ``model/calibration.json`` are replaced (each file
atomically, as training writes them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medusa_lora.config import MedusaConfig
from medusa_lora.model import MedusaLoraModel
from medusa_lora.training.calibrate import CALIBRATION_FILE, calibrate
from medusa_lora.training.config import load_config
from medusa_lora.training.data import load_training_data
from medusa_lora.tree import calibrated_tree, expected_accepted_length

SIZES = (5, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="training output dirs (config.yaml, model/)")
    parser.add_argument("--write", action="store_true", help="replace the model's calibration")
    args = parser.parse_args()
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        model = MedusaLoraModel.from_pretrained(cfg.model, run / "model")
        old_rates = model.config.hit_rates
        data = load_training_data(cfg, model.tokenizer)
        held_out = data.validation.select(range(min(cfg.calibration_samples, len(data.validation))))
        result = calibrate(model, held_out, data.collator, cfg.eval_batch_size, cfg.tree_size)
        print(f"{run}: top-1 given the heads before right {[round(r[0], 3) for r in result.hit_rates]}")
        print(f"{' ' * len(str(run))}  top-1 everywhere {[round(r, 3) for r in result.head_top1]}")
        for size in SIZES:
            new = expected_accepted_length(calibrated_tree(result.hit_rates, size), result.hit_rates)
            line = f"  {size:2d} nodes: predicted {new:.2f} tokens/step"
            if old_rates:
                old_tree = calibrated_tree(old_rates, size)
                line += (
                    f"; the old calibration's tree: {expected_accepted_length(old_tree, old_rates):.2f} by its "
                    f"rates, {expected_accepted_length(old_tree, result.hit_rates):.2f} by the new ones"
                )
            print(line)
        if args.write:
            config = MedusaConfig.load(run / "model")
            config.tree, config.hit_rates = result.tree, result.hit_rates
            config.save(run / "model")
            result.save(run / "model" / CALIBRATION_FILE)
            print(f"  wrote {run / 'model'}")


if __name__ == "__main__":
    main()
