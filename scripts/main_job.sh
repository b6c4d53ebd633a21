#!/usr/bin/env bash
# The main job: demo model, task data, the task Medusa-LoRA and the same LoRA trained alone, then the tok/s
# and quality tables on the task's test prompts and on general prompts (runs/eval/{task,general}/report.{json,png}).
# The generic Medusa heads (the baseline) are the shipped ones in eval/tasks/generic_heads/ (made by
# scripts/make_generic_heads.sh, about an hour here; REBUILD_GENERIC_HEADS=1 reruns it first). Run after
# scripts/setup.sh, with medusa-lora installed in $PYTHON (default: python). Sized for 30 minutes on 2 CPU cores.
# Finished steps are reused when run again (delete data/ or runs/<name>/ to redo one); the evals always
# run, and fail the job if a speculative row's output differs from the non-speculative one (in fp32).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
EVAL_PROMPTS=${EVAL_PROMPTS:-12}
GENERAL_PROMPTS=${GENERAL_PROMPTS:-6}
DTYPE=${DTYPE:-fp32}
GENERIC_HEADS=eval/tasks/generic_heads/smollm2-135m

medusa_lora() {
  echo "+ [$(date -u +%T)] medusa-lora $*" >&2
  "$PY" -m medusa_lora.cli "$@"
}

model_dir() {  # where `medusa-lora train --config $1 [--set KEY=VALUE ...]` saves its model
  "$PY" -c 'import sys; from medusa_lora.training.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).output_dir + "/model")' "$1" "${@:2}"
}

train() {  # train unless the model is saved; --resume continues an interrupted run from its checkpoint
  local model sets=()
  model=$(model_dir "$@")
  for kv in "${@:2}"; do sets+=(--set "$kv"); done
  if [ -f "$model/medusa_config.json" ]; then
    echo "reusing $model" >&2
  else
    medusa_lora train --config "$1" --resume "${sets[@]}"
  fi
}

medusa_lora prepare-model
if [ "${REBUILD_GENERIC_HEADS:-0}" = 1 ]; then
  PYTHON=$PY bash scripts/make_generic_heads.sh
fi
medusa_lora make-task-data --out-dir data/task
medusa_lora make-generic-prompts --out-dir data/generic-prompts
train training/configs/cpu-task.yaml
TASK=$(model_dir training/configs/cpu-task.yaml)
# The quality reference: the same LoRA trained alone (same data, steps and settings, no heads)
ALONE=(mode=lora heads_replay_epochs=0 output_dir=runs/task-lora-alone)
train training/configs/cpu-task.yaml "${ALONE[@]}"
LORA_ALONE=$(model_dir training/configs/cpu-task.yaml "${ALONE[@]}")
echo "== the task's test prompts ($DTYPE)" >&2
medusa_lora eval --task-adapter "$TASK" --generic-heads "$GENERIC_HEADS" --dtype "$DTYPE" \
  --test-file data/task/test.jsonl --validation-file data/task/validation.jsonl --scorer query \
  --lora-alone "$LORA_ALONE" --num-prompts "$EVAL_PROMPTS" --num-validation-prompts 3 --out-dir runs/eval/task
echo "== general prompts, off the task ($DTYPE)" >&2
medusa_lora eval --task-adapter "$TASK" --generic-heads "$GENERIC_HEADS" --dtype "$DTYPE" \
  --test-file data/generic-prompts/test.jsonl --validation-file data/generic-prompts/validation.jsonl \
  --scorer none --num-prompts "$GENERAL_PROMPTS" --num-validation-prompts 2 --max-new-tokens 96 \
  --out-dir runs/eval/general
