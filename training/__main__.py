"""``python -m medusa_lora.training``: what ``accelerate launch -m`` and ``torchrun -m`` run."""

import sys

from medusa_lora.cli.train import main

sys.exit(main())
