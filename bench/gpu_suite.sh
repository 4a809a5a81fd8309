#!/usr/bin/env bash
# One command for a machine with a GPU: build the CUDA ops, run the CUDA tests + opcheck, run the kernel
# benchmarks, write CSV/JSON to OUT_DIR.
#   bash bench/gpu_suite.sh [OUT_DIR]          (default bench_out/gpu)
# Optional: a wheels/ folder with pure-Python wheels (diffusers, huggingface_hub, ...) for offline machines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d wheels ]; then
  $PY -m pip install -q --no-index --find-links wheels --no-deps wheels/*.whl >"$OUT/pip.log" 2>&1 || true
fi
# Build only for the GPU present unless the caller chose archs.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch;c=torch.cuda.get_device_capability();print(f"{c[0]}.{c[1]}")')}
echo "== build (archs $TORCH_CUDA_ARCH_LIST)"
t0=$(date +%s)
$PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 ))s"
$PY -m halodiff info --json >"$OUT/info.json"
$PY -m halodiff info | head -5
echo "== CUDA/Triton tests + opcheck"
$PY -m pytest -q -ra tests/test_ops.py tests/test_op_errors.py tests/test_compile.py tests/test_native_build.py \
  $(ls tests/test_segmented_attention.py 2>/dev/null) -m "not slow" --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt" | tail -15
echo "== kernel benchmarks"
HALODIFF_BENCH_OUT="$OUT" $PY -m pytest -q bench/test_kernels.py $(ls bench/test_segmented_attention_bench.py 2>/dev/null) \
  -p no:cacheprovider --benchmark-columns=median 2>&1 | tee "$OUT/bench.txt" | tail -5
for f in "$OUT"/*.csv; do echo "== $f"; column -s, -t <"$f" | cut -c1-200; done
