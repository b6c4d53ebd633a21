#!/usr/bin/env bash
# The GPU check, one command (< 10 minutes on one H100): the kernel and fast-path tests compiled (not
# interpreted) in fp32, fp16 and bf16; the kernel benchmark and the step's cost per forward
# (scripts/bench_forward.py); the eval end to end on the fast path (static cache + CUDA graphs) in bf16 and
# fp32 and on the eager path in bf16; then one summary. Run from anywhere, with medusa-lora installed in $PYTHON (default:
# python; an editable install, `pip install -e .`, as scripts/setup.sh makes: run from the repo root, a plain
# install is shadowed by the source folder). Without CUDA it runs nothing and exits 2. Logs and reports go to
# runs/gpu-check/.
#   scripts/gpu_check.sh [kernels] [eval]   the named parts only (default: both)
# The eval reuses runs/task-medusa-lora/model (the main job's task adapter) when present, else trains that
# config once (minutes on a GPU) into runs/gpu-check/; the generic-heads row uses the shipped heads, as the
# main job does. Environment: EVAL_PROMPTS (default 10) test prompts, EVAL_VALIDATION_PROMPTS (default 2)
# validation prompts that tune the peer and hybrid rows, EVAL_TIMEOUT (default 1200) seconds per eval,
# EVAL_RUNS (default "bf16:fast fp32:fast bf16:eager") the evals as DTYPE:FORWARD, KERNEL_BENCH=0 skips the
# kernel bench, BENCH_MODEL (a config.json: the step bench on random weights of that shape, before the model
# is prepared).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=runs/gpu-check
EVAL_PROMPTS=${EVAL_PROMPTS:-10}
EVAL_VALIDATION_PROMPTS=${EVAL_VALIDATION_PROMPTS:-2}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-1200}
EVAL_RUNS=${EVAL_RUNS:-bf16:fast fp32:fast bf16:eager}
GENERIC_HEADS=eval/tasks/generic_heads/smollm2-135m
PARTS=${*:-kernels eval}
for part in $PARTS; do
  case $part in kernels | eval) ;; *) echo "error: unknown part '$part' (parts: kernels, eval)" >&2; exit 2 ;; esac
done

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "scripts/gpu_check.sh needs a CUDA GPU: torch.cuda.is_available() is False here, so nothing was run." >&2
  exit 2
fi
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
mkdir -p "$OUT"
status=0
step() {  # step NAME CMD...: run CMD, log to $OUT/NAME.log, record pass/fail
  local name=$1
  shift
  echo "+ $*" >&2
  if "$@" >"$OUT/$name.log" 2>&1; then echo "$name: ok" >>"$OUT/summary.txt"; else
    echo "$name: FAILED (see $OUT/$name.log)" >>"$OUT/summary.txt"; status=1; fi
}
: >"$OUT/summary.txt"
rm -f "$OUT/task_model.txt"
medusa_lora() { "$PY" -m medusa_lora.cli "$@"; }

kernel_tests() {
  "$PY" -c 'from medusa_lora.kernels._triton import is_interpreted
from medusa_lora.kernels.tree_attention import _tree_attn_fwd_kernel
assert not is_interpreted(_tree_attn_fwd_kernel), "the Triton kernels are interpreted"' || return 1
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_tree_attention.py tests/test_kernels_compact_kv.py \
    tests/test_kernels_dispatch.py tests/test_generation_triton.py tests/test_forward.py
}
if [[ " $PARTS " == *" kernels "* ]]; then
  step kernel_tests kernel_tests
  if [ "${KERNEL_BENCH:-1}" != 0 ]; then step kernel_bench "$PY" -m medusa_lora.kernels.bench; fi
  step forward_bench "$PY" scripts/bench_forward.py ${BENCH_MODEL:+--random-config "$BENCH_MODEL"}
fi

task_model() {  # (`step` runs it in an `if`, where set -e is off: every failure returns explicitly)
  medusa_lora prepare-model || return 1
  medusa_lora make-task-data --out-dir data/task || return 1
  if [ -f runs/task-medusa-lora/model/medusa_config.json ]; then
    echo runs/task-medusa-lora/model >"$OUT/task_model.txt"
  else
    medusa_lora train --config training/configs/cpu-task.yaml --set output_dir="$OUT/task-medusa-lora" \
      --resume || return 1
    echo "$OUT/task-medusa-lora/model" >"$OUT/task_model.txt"
  fi
}
if [[ " $PARTS " == *" eval "* ]]; then
  step task_model task_model
  if [ -f "$OUT/task_model.txt" ]; then
    for run in $EVAL_RUNS; do
      dtype=${run%:*} forward=${run#*:}
      step "eval_${dtype}_$forward" timeout "$EVAL_TIMEOUT" env MEDUSA_LORA_FAST_PATH=$([ "$forward" = fast ] && echo 1 || echo 0) \
        "$PY" -m medusa_lora.cli eval --task-adapter "$(cat "$OUT/task_model.txt")" --generic-heads "$GENERIC_HEADS" \
        --scorer query --test-file data/task/test.jsonl --validation-file data/task/validation.jsonl --dtype "$dtype" \
        --num-prompts "$EVAL_PROMPTS" --num-validation-prompts "$EVAL_VALIDATION_PROMPTS" \
        --out-dir "$OUT/eval-$dtype-$forward"
    done
  fi
fi

echo "=== GPU check summary ($("$PY" -c 'import torch; print(torch.cuda.get_device_name())')) ==="
cat "$OUT/summary.txt"
if [ -f "$OUT/kernel_tests.log" ]; then grep -E "passed|failed|error" "$OUT/kernel_tests.log" | tail -1 || true; fi
if [ -f "$OUT/kernel_bench.log" ]; then tail -n 40 "$OUT/kernel_bench.log"; fi
if [ -f "$OUT/forward_bench.log" ]; then tail -n 6 "$OUT/forward_bench.log"; fi
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for report in sorted(Path(sys.argv[1]).glob("eval-*/report.json")):
    print(f"{report.parent.name}:")
    for row in json.loads(report.read_text())["rows"]:
        same = sum(p["identical"] for p in row["prompts"])
        print(f"  ({row['key']}) {row['name']}: {row['tokens_per_s']:.1f} tok/s, x{row['speedup']:.2f}, "
              f"{same}/{len(row['prompts'])} identical to greedy")
EOF
exit $status
