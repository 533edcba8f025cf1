#!/usr/bin/env bash
# The CUDA checks of issue 12 as one prepared run for a session lent a GPU (the device tool's
# `run`, which sets $OUT and copies back what is written there; not yet run on a GPU):
#
#   bash bench/gpu_session.sh
#
# 1. bench/step_paths.py: one training step of standard / JumpReLU, dense vs sparse path, per
#    density (bf16 autocast): where the sparse path pays on the GPU (kernels.SPARSE_DEVICES).
# 2. bench/memory_check.py --device cuda: measured torch.cuda.max_memory_allocated per phase
#    (initialisation, steps, evaluation + save, export) of every encoder type against
#    estimate_memory, each config in a fresh process — what the dense types' CUDA terms are
#    fitted to.
# 3. bench/memory_trace.py --device cuda: CUDA's allocation history of the dense types' runs
#    (standard, JumpReLU, BatchTopK; TopK beside them) replayed: each phase's peak and the
#    allocations alive then, by the line of our code that made them — why the dense types
#    measured 2-3x their estimate on an H200 (bench/memory-results-cuda.md).
# Uses the machine's python3 (torch with CUDA, transformers, safetensors, numpy); DEVICE=cpu
# and STEP_ARGS / MEM_ARGS / TRACE_ARGS (extra flags) make a quick local smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-session}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.log"
# shellcheck disable=SC2086
$PY bench/step_paths.py --device "$DEVICE" --out-dir "$OUT" ${STEP_ARGS:-} 2>&1 \
    | tee "$OUT/step_paths.log"
# memory_check exits 1 when a config is outside 0.85-1.15: that is a finding, not a failure
rc=0
# shellcheck disable=SC2086
$PY bench/memory_check.py --device "$DEVICE" --out-dir "$OUT" ${MEM_ARGS:-} 2>&1 \
    | tee "$OUT/memory_check.log" || rc=$?
if [ "$rc" = 1 ]; then echo "memory_check: some estimates are outside 15% (see the table)";
elif [ "$rc" != 0 ]; then exit "$rc"; fi
# shellcheck disable=SC2086
$PY bench/memory_trace.py --device "$DEVICE" --out-dir "$OUT" ${TRACE_ARGS:-} 2>&1 \
    | tee "$OUT/memory_trace.md"
ls -l "$OUT"
