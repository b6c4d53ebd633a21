"""Training: Medusa heads jointly with a task LoRA (``medusa-lora``), heads alone or LoRA alone."""

from medusa_lora.training.config import TrainConfig, load_config
from medusa_lora.training.loop import train

__all__ = ["TrainConfig", "load_config", "train"]
