"""Writing a task's train/validation/test jsonl splits: reused when made with the same parameters, never
replacing data made otherwise unless asked, each file written atomically."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_lora.atomic import atomic_write_text

SPLITS = ("train", "validation", "test")
Records = dict[str, list[dict[str, Any]]]


def write_splits(
    out_dir: str | os.PathLike[str],
    meta: dict[str, Any],
    make: Callable[[], Records],
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``{split}.jsonl`` from ``make()`` and ``meta.json`` into ``out_dir``; reuse the files when
    ``meta.json`` equals ``meta``. Raises ``FileExistsError`` if ``out_dir`` holds data made otherwise,
    unless ``overwrite``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    meta_path = out / "meta.json"
    existing = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else None
    if existing == meta and all(p.exists() for p in paths.values()):
        return paths
    foreign = existing is None and any(p.exists() for p in paths.values())
    if not overwrite and (foreign or existing not in (None, meta)):
        raise FileExistsError(
            f"{out} holds data made with {existing or 'unknown parameters'}, not {meta}; "
            "pass overwrite=True (--overwrite) to replace it or choose another directory"
        )
    meta_path.unlink(missing_ok=True)  # until the new meta lands, a crash leaves files that are not reused
    for split, records in make().items():
        atomic_write_text(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return paths


@dataclass(frozen=True)
class GeneratedSplits:
    """A generated dataset: ``make(seed, n_train, n_validation, n_test)`` builds its splits, ``meta`` holds
    what else identifies the data (e.g. a format version), ``sizes`` the default split sizes, and
    ``command``, ``description`` and ``out_dir`` its ``medusa-lora`` data command."""

    make: Callable[[int, int, int, int], Records]
    meta: dict[str, Any]
    sizes: tuple[int, int, int]
    command: str
    description: str
    out_dir: Path

    def write(
        self,
        out_dir: str | os.PathLike[str],
        seed: int = 0,
        n_train: int | None = None,
        n_validation: int | None = None,
        n_test: int | None = None,
        overwrite: bool = False,
    ) -> dict[str, Path]:
        """``write_splits`` of ``make(seed, ...)`` (unset sizes: the defaults). The seed and the sizes join
        ``meta``, so data made with other ones is never silently reused; ``FileExistsError`` if ``out_dir``
        holds data made otherwise, unless ``overwrite``."""
        given = (n_train, n_validation, n_test)
        sizes = tuple(default if n is None else n for n, default in zip(given, self.sizes, strict=True))
        params = {"seed": seed, **{f"n_{split}": n for split, n in zip(SPLITS, sizes, strict=True)}}
        return write_splits(out_dir, {**self.meta, **params}, lambda: self.make(seed, *sizes), overwrite)

    def main(self, argv: list[str] | None = None) -> int:
        """The data command: --out-dir/--seed/--n-train/--n-validation/--n-test/--overwrite, then ``write``;
        prints the paths."""
        parser = argparse.ArgumentParser(prog=self.command, description=self.description)
        parser.add_argument("--out-dir", type=Path, default=self.out_dir)
        parser.add_argument("--seed", type=int, default=0)
        for split, size in zip(SPLITS, self.sizes, strict=True):
            parser.add_argument(f"--n-{split}", type=int, default=size, help=f"{split} records")
        parser.add_argument("--overwrite", action="store_true", help="replace data made with other options")
        args = parser.parse_args(argv)
        try:
            paths = self.write(
                args.out_dir, args.seed, args.n_train, args.n_validation, args.n_test, args.overwrite
            )
        except FileExistsError as err:
            parser.error(str(err))
        for split, path in paths.items():
            print(f"{split}: {path}")
        return 0
