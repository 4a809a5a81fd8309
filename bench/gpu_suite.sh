#!/usr/bin/env bash
# One command for a machine with one GPU (H100/H200: <= 8 min, the build for that GPU's arch included):
#   bash bench/gpu_suite.sh [OUT_DIR]          (default bench_out/gpu)
# Writes OUT_DIR/gpu_suite.json (every step's result, merged) plus a log per step. A failing step is
# recorded and the suite goes on; the exit code is non-zero if any step failed.
#   1 build for this GPU only                 5 kernel benchmarks at per-rank SD1.5/SDXL shapes, 2/4/8 ranks
#   2 CUDA tests, v2 and v1 kernels           6 engine checks (hook: CUDA-graph capture, e2e step)
#   3 compute-sanitizer memcheck + racecheck  7 bench/project_gpus.py (needs diffusers: else skipped)
#   4 checks: sync-debug, odd offsets,        8 static kernel audit for this arch
#     Lq < 64, > 16 segments on Triton
# The device machine may lack diffusers and the network: steps that need diffusers are skipped with a reason.
# Optional: a wheels/ folder of pure-Python wheels (diffusers, huggingface_hub, ...) installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
FAILED=()
STEPS=()
step() {  # step NAME TIMEOUT_S CMD... : runs CMD with a time limit, logs to $OUT/NAME.log, records the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$name.log"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$OUT/status_$name.json"
  STEPS+=("$OUT/status_$name.json")
  [ "$rc" -eq 0 ] || FAILED+=("$name")
  return 0
}
if [ -d wheels ]; then
  $PY -m pip install -q --no-index --find-links wheels --no-deps wheels/*.whl >"$OUT/pip.log" 2>&1 || true
fi

# 1. Build only for the GPU present (with PTX for it) unless the caller chose archs.
CAP=$($PY -c 'import torch;c=torch.cuda.get_device_capability();print(f"{c[0]}.{c[1]}")') || { echo "no CUDA GPU"; exit 2; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build 300 $PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -m halodiff info --json >"$OUT/info.json" 2>/dev/null || true

# 2. CUDA tests (every backend, default kernel v2), then the attention tests again with the v1 kernel: the
#    choice is read once per process, so v1 gets its own pytest run.
step tests_v2 240 $PY -m pytest -q -ra tests/test_segmented_attention_cuda.py tests/test_segmented_attention.py \
  tests/test_ops.py tests/test_native_build.py -m "not slow" -p no:cacheprovider --junitxml="$OUT/tests_v2.xml"
HALODIFF_ATTENTION_KERNEL=v1 step tests_v1 120 $PY -m pytest -q -ra tests/test_segmented_attention_cuda.py \
  -p no:cacheprovider --junitxml="$OUT/tests_v1.xml"

# 3. compute-sanitizer on a small subset (a few op calls at small shapes).
if command -v compute-sanitizer >/dev/null; then
  for TOOL in memcheck racecheck; do
    step "sanitizer_$TOOL" 150 compute-sanitizer --tool "$TOOL" --error-exitcode 3 $PY bench/gpu_suite.py sanitize
  done
else
  echo '{"skipped": "compute-sanitizer not on PATH"}' >"$OUT/sanitizer.json"
fi

# 4. Checks: sync debug mode "error" around the ops, odd-offset views, Lq < 64, > 16 segments on Triton, v1 vs v2.
step checks 120 $PY bench/gpu_suite.py checks "$OUT/checks.json"

# 5. Kernel benchmarks: per-rank SD1.5/SDXL shapes, 2/4/8 ranks, vs torch.cat + SDPA (flash) and F.group_norm + F.silu.
step kernel_bench 150 $PY bench/gpu_suite.py bench "$OUT/kernel_bench.json"

# 6. Engine (needs diffusers): CUDA-graph capture of patched steps (every step kind; outputs vs eager, no host
#    sync in steady steps) and the single-GPU SD1.5-architecture step (fp16), unpatched vs DeepCache.
if $PY -c "import diffusers" 2>/dev/null; then
  step graph_capture 120 $PY bench/gpu_engine.py graphs --json "$OUT/graph_capture.json"
  step e2e_step 120 $PY bench/gpu_engine.py step --json "$OUT/e2e_step.json"
else
  for name in graph_capture e2e_step; do
    echo '{"skipped": "diffusers is not installed on this machine (put its wheels in wheels/ to run this step)"}' \
      >"$OUT/$name.json"
  done
fi

# 7. Projected N-GPU speedup from this one GPU (needs diffusers for the UNet).
if $PY -c "import diffusers" 2>/dev/null; then
  step project_gpus 120 $PY bench/project_gpus.py --model sd15 --resolutions 512 --ranks 2 4 8 --json "$OUT/project_gpus.json"
else
  echo '{"skipped": "diffusers is not installed on this machine (put its wheels in wheels/ to run this step)"}' \
    >"$OUT/project_gpus.json"
fi

# 8. Static audit of the kernels as built for this GPU.
SM=${CAP/./}
step audit 120 $PY bench/kernel_audit.py --out "$OUT/audit" --arch "$SM" --only cuda

PARTS=("$OUT/checks.json" "$OUT/kernel_bench.json" "$OUT/project_gpus.json" "$OUT/graph_capture.json" "$OUT/e2e_step.json" "${STEPS[@]}")
[ -f "$OUT/sanitizer.json" ] && PARTS+=("$OUT/sanitizer.json")
$PY bench/gpu_suite.py merge "$OUT/gpu_suite.json" "${PARTS[@]}"
echo "== $OUT/gpu_suite.json; failed steps: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
