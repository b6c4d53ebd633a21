"""A non-editable install (the wheel) ships one namespace, medusa_lora, with all its subpackages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
    )
    return next(out.glob("medusa_lora-*.whl"))


def test_wheel_holds_only_the_medusa_lora_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"medusa_lora"}
    for sub in ("training", "kernels", "eval"):
        assert f"medusa_lora/{sub}/__init__.py" in names
    assert any(n.startswith("medusa_lora/training/configs/") and n.endswith(".yaml") for n in names)


def test_installed_wheel_imports_every_subpackage(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
    )
    code = (
        "import medusa_lora, medusa_lora.kernels, medusa_lora.training, medusa_lora.eval, medusa_lora.cli;"
        "print(medusa_lora.__file__); print(medusa_lora.kernels.__file__); print(medusa_lora.eval.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    for line in out.stdout.split():
        assert line.startswith(str(site)), line
