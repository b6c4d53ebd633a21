"""Exceptions that name what is wrong with a user's input."""


class MedusaLoraError(Exception):
    """Base class of every error medusa-lora raises on purpose."""


class ConfigError(MedusaLoraError, ValueError):
    """A config file or dict has unknown keys, missing keys or bad values."""


class IncompatibleBaseModelError(MedusaLoraError, ValueError):
    """Heads or an adapter were trained for another base model (sizes or weights differ)."""


class CheckpointError(MedusaLoraError, OSError):
    """A saved model directory is missing files, holds corrupt ones, or would be overwritten."""


class PromptError(MedusaLoraError, ValueError):
    """A prompt is empty or does not fit the model's context."""
