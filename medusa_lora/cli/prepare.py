"""``medusa-lora prepare-model``: the offline demo model as a Hugging Face directory."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medusa-lora prepare-model", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if the prepared model exists")
    args = parser.parse_args(argv)
    from medusa_lora.model.demo import prepare_demo_model

    print(prepare_demo_model(force=args.force))
    return 0
