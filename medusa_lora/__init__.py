"""medusa-lora: Medusa heads trained jointly with a task LoRA for lossless speculative decoding."""

__version__ = "0.1.0"
