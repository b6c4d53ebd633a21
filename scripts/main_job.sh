#!/usr/bin/env bash
# The main job: demo model, task data, self-distilled generic data, generic Medusa heads, the task
# Medusa-LoRA, then the tok/s report (runs/eval/report.{json,png}). Run after scripts/setup.sh, with
# medusa-lora installed in $PYTHON (default: python). Sized for 30 minutes on 2 CPU cores.
# Finished steps are reused when run again (delete data/ or runs/<name>/ to redo one); the eval always runs,
# and fails the job if a speculative row's output differs from the non-speculative one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
GENERIC_PROMPTS=${GENERIC_PROMPTS:-160}  # self-distillation: about 4 minutes on 2 CPU cores
EVAL_PROMPTS=${EVAL_PROMPTS:-20}
GENERIC_DATA=data/generic/train.jsonl

medusa_lora() {
  echo "+ medusa-lora $*" >&2
  "$PY" -m medusa_lora.cli "$@"
}

model_dir() {  # where `medusa-lora train --config $1` saves its model
  "$PY" -c 'import sys; from medusa_lora.training.config import load_config
print(load_config(sys.argv[1]).output_dir + "/model")' "$1"
}

train() {  # train unless the model is saved; --resume continues an interrupted run from its checkpoint
  local model
  model=$(model_dir "$1")
  if [ -f "$model/medusa_config.json" ]; then
    echo "reusing $model" >&2
  else
    medusa_lora train --config "$1" --resume
  fi
}

medusa_lora prepare-model
medusa_lora make-task-data --out-dir data/task
if [ -f "$GENERIC_DATA" ] && [ "$(wc -l <"$GENERIC_DATA")" -eq "$GENERIC_PROMPTS" ]; then
  echo "reusing $GENERIC_DATA" >&2
else
  medusa_lora distill --model smollm2-135m --prompts "generic:$GENERIC_PROMPTS" --max-new-tokens 128 --out "$GENERIC_DATA"
fi
train training/configs/cpu-generic-heads.yaml
train training/configs/cpu-task.yaml
medusa_lora eval \
  --task-adapter "$(model_dir training/configs/cpu-task.yaml)" \
  --generic-heads "$(model_dir training/configs/cpu-generic-heads.yaml)" \
  --test-file data/task/test.jsonl --num-prompts "$EVAL_PROMPTS" --out-dir runs/eval
