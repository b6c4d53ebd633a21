"""The package's shape: the public API, where moved modules went, and imports that only go down
(kernels <- core <- training, eval, serving <- cli)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import medusa_lora

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as
SOURCES = {
    "medusa_lora": "medusa_lora",
    "training": "medusa_lora.training",
    "kernels": "medusa_lora.kernels",
    "eval": "medusa_lora.eval",
}
# each layer and the medusa_lora layers it may import (its own included)
LAYERS = {
    "kernels": {"kernels"},
    "core": {"kernels", "core"},
    "training": {"kernels", "core", "training"},
    "eval": {"kernels", "core", "eval"},
    "serving": {"kernels", "core", "serving"},
    "cli": {"kernels", "core", "training", "eval", "serving", "cli"},
}
ENTRY_POINTS = {"training/__main__.py"}  # `python -m medusa_lora.training` runs the CLI's train


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("kernels", "training", "eval", "serving", "cli"):
        return parts[1]
    return "core"


def modules() -> list[tuple[str, str, Path]]:
    """(module name, source path relative to the repo, path) of every module the package installs."""
    found = []
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if folder == "medusa_lora" and parts and parts[0] in ("training", "kernels", "eval"):
                continue
            found.append((name, str(path.relative_to(ROOT)), path))
    return found


def imported(path: Path, module: str) -> set[str]:
    """The medusa_lora modules ``path`` imports (relative imports resolved against ``module``)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return {n for n in names if n == "medusa_lora" or n.startswith("medusa_lora.")}


@pytest.mark.parametrize("name", medusa_lora.__all__)
def test_the_public_api_imports_from_the_top(name):
    assert getattr(medusa_lora, name) is not None


def test_a_moved_module_names_where_it_went():
    with pytest.raises(
        ModuleNotFoundError, match=r"medusa_lora\.tree_choice moved to medusa_lora\.trees\.choice"
    ):
        importlib.import_module("medusa_lora.tree_choice")
    with pytest.raises(ModuleNotFoundError, match=r"medusa_lora\.config moved to medusa_lora\.model\.config"):
        importlib.import_module("medusa_lora.config")
    from medusa_lora.generation import generate  # what the flat layout's README showed still works

    assert generate is medusa_lora.generate


def test_imports_only_go_down():
    wrong = []
    for module, source, path in modules():
        if source in ENTRY_POINTS:
            continue
        allowed = LAYERS[layer(module)]
        for target in imported(path, module):
            if target != "medusa_lora" and layer(target) not in allowed:
                wrong.append(f"{source} ({layer(module)}) imports {target} ({layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_core_has_few_top_level_modules_and_concepts_as_subpackages():
    top = [p.stem for p in (ROOT / "medusa_lora").glob("*.py")]
    assert len(top) <= 10, top
    for concept in ("model", "drafting", "trees", "verification", "formats", "serving", "cli"):
        assert (ROOT / "medusa_lora" / concept / "__init__.py").is_file()


@pytest.mark.parametrize("pypi_kernels", [True, False])
def test_the_kernels_folder_does_not_shadow_the_pypi_kernels_package(tmp_path, pypi_kernels):
    """From a checkout's root (on sys.path under `python -m`), `import kernels` is PyPI's package where it is
    installed (transformers >= 5.25 imports it); transformers imports either way, ours stays medusa_lora.kernels."""
    import subprocess
    import sys

    if pypi_kernels:
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("PYPI = True\n")
    # transformers only where `kernels` is the one installed here (a stand-in lacks what it imports)
    code = "" if pypi_kernels else "from transformers import LlamaConfig; "
    code += "import kernels, medusa_lora.kernels as ours; print(getattr(kernels, 'PYPI', False), ours.kernel_backend.__name__)"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(pypi_kernels), "kernel_backend"]
