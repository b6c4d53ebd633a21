"""Checkpoint files: a directory written atomically (built beside the target, swapped in with renames), a
JSON object read with an error naming the file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medusa_lora.errors import CheckpointError


@contextmanager
def atomic_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging dir; when the block succeeds it replaces ``directory``, else it is removed.

    A crash never leaves a half-written ``directory``; a non-empty one is only replaced with ``overwrite``.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        yield staging
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``, replacing any old one with two renames (no partial state)."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed over it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``path``; CheckpointError if it is absent (``missing`` says why that matters), not
    JSON, or not an object."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {missing}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
