#!/usr/bin/env bash
# Generic Medusa heads for the demo model, made as Medusa makes its public heads: broad general prompts
# (1,200 train + 100 validation, varied: 27 kinds of instruction) answered by the base model itself, then
# heads-only training on those answers until held-out top-1 stops improving (early stopping).
# The result is shipped in eval/tasks/generic_heads/smollm2-135m (the main job reuses it); this script
# regenerates it. About 60-70 minutes on 2 CPU cores (distillation ~40, training ~25).
# Run after scripts/setup.sh, with medusa-lora installed in $PYTHON (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-eval/tasks/generic_heads/smollm2-135m}
medusa_lora() {
  echo "+ medusa-lora $*" >&2
  "$PY" -m medusa_lora.cli "$@"
}
distill() {  # $1 split: answer the prompts unless done
  local prompts=data/generic-prompts/$1.jsonl out=data/generic/$1.jsonl
  if [ -f "$out" ] && [ "$(wc -l <"$out")" -eq "$(wc -l <"$prompts")" ]; then
    echo "reusing $out" >&2
  else
    medusa_lora distill --model smollm2-135m --prompts "$prompts" --out "$out" --max-new-tokens 128 --batch-size 16
  fi
}
medusa_lora prepare-model
medusa_lora make-generic-prompts --out-dir data/generic-prompts
distill validation
distill train
if [ -f runs/generic-heads/model/medusa_config.json ]; then
  echo "reusing runs/generic-heads/model" >&2
else
  medusa_lora train --config training/configs/cpu-generic-heads.yaml --resume
fi
mkdir -p "$OUT"
cp runs/generic-heads/model/medusa_heads.safetensors runs/generic-heads/model/medusa_config.json \
  runs/generic-heads/model/calibration.json "$OUT/"
echo "generic heads written to $OUT" >&2
