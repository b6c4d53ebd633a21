"""``accelerate launch -m medusa_lora.training --config <yaml> [--set k=v ...] [--resume]``."""

from medusa_lora.training.cli import main

raise SystemExit(main())
