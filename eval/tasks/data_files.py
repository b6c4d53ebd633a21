"""The generators' data (word pools, the column catalogue, wording) lives in YAML files in ``data/`` beside
this module; each generator module loads its files once, on import, and keeps its logic in Python."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's is ~10x faster; both safe, same types


def load_data(name: str) -> Any:
    """The parsed ``data/<name>`` YAML file (safe loader: plain strings, numbers, booleans, lists, dicts)."""
    text = (resources.files(__package__) / "data" / name).read_text(encoding="utf-8")
    return yaml.load(text, Loader=_LOADER)
