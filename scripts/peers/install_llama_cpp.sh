#!/usr/bin/env bash
# llama-cpp-python for scripts/bench_engines.py, in its own venv (.peers/llama-cpp; benchmark-only, not in
# CI). It builds llama.cpp from the registry's sdist for this CPU: about 20 minutes on 2 cores. AMX builds
# segfaulted on batched prefill: GGML_AMX=OFF (the bench also runs prefill with n_batch=1 where AMX exists).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.peers/llama-cpp}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX=OFF" MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 \
  "$VENV/bin/python" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==${LLAMA_CPP_VERSION:-0.3.36}"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
