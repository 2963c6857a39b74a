#!/usr/bin/env bash
# One device call for engmoe's Hopper grouped GEMM (csrc/sm90/, docs/kernels-sm90.md), about 6 minutes on one H200:
# the library (carried, or built here from the carried nvidia-cutlass wheel), its GPU tests, compute-sanitizer
# memcheck and racecheck on a tiny case, then bench/sm90_gemm.py (sm90 vs torch._grouped_mm vs grouped_gemm vs
# dense, 8k/32k tokens x top-8 over 16/64 experts). Results and logs under $OUT.
#   carry .whl (megatron_core wheel: the MoE layer tests need it; the wheels in it are installed to /tmp/site) and
#   build/sm90/libengmoe_sm90.so (built where nvcc and the headers are: python -m engmoe.kernels.build_sm90),
#   or put nvidia_cutlass-*.whl in .whl to build it here (about 2 minutes on 16 cores); --rebuild forces the build.
#   bash bench/sm90_gemm_gpu.sh [--rebuild] [bench args...]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engmoe_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
LOG=$OUT/sm90_run.log
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
log() { echo "=== +$(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }
REBUILD=0; BENCH_ARGS=()
for a in "$@"; do case $a in --rebuild) REBUILD=1;; *) BENCH_ARGS+=("$a");; esac; done

log start
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
  echo "wheels installed: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')" | tee -a "$LOG"
fi
LIB=build/sm90/libengmoe_sm90.so
if [ $REBUILD = 1 ] || [ ! -f "$LIB" ]; then
  log "build $LIB (CUTLASS headers: \$ENGMOE_CUTLASS_DIR or the nvidia-cutlass wheel)"
  timeout 300 python3 -m engmoe.kernels.build_sm90 -j 14 >"$OUT/sm90_build.log" 2>&1
  echo "build rc=$?" | tee -a "$LOG"; tail -3 "$OUT/sm90_build.log" | tee -a "$LOG"
fi
python3 -c "from engmoe.kernels import sm90_gemm as s; print('sm90 usable:', s.usable(), s.unusable_reason(), \
{k: s.configs(k) for k in s.KINDS})" 2>&1 | tail -2 | tee -a "$LOG"

# engmoe._C (the cuda backend's dispatch ops: the MoE-layer tests on sm90 need it) builds while the sanitizers run
( PYTHONPATH=/tmp/site ENGMOE_CUDA_ARCHS=90a ENGMOE_SKIP_SM90_BUILD=1 MAX_JOBS=8 timeout 300 python3 setup.py -q build_ext --inplace \
  >"$OUT/ext_build.log" 2>&1 ) &
EXT=$!

for tool in memcheck racecheck; do
  log "compute-sanitizer $tool"
  env=(); [ $tool = memcheck ] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  env "${env[@]}" timeout 130 compute-sanitizer --tool $tool --error-exitcode 1 \
    python3 tests/kernels/sm90_sanitize_small.py >"$OUT/sm90_$tool.log" 2>&1
  echo "$tool rc=$?" | tee -a "$LOG"; tail -4 "$OUT/sm90_$tool.log" | tee -a "$LOG"
done

log "gpu tests"
wait $EXT; echo "engmoe._C build rc=$? (the layer tests need it)" | tee -a "$LOG"
timeout 260 python3 -m pytest -q -m gpu tests/kernels/test_sm90_gemm.py tests/bench/test_timed_hold_gpu.py \
  -p no:cacheprovider -rfEs \
  >"$OUT/sm90_tests.log" 2>&1
echo "pytest rc=$?" | tee -a "$LOG"
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|Error" "$OUT/sm90_tests.log" | tail -25 | tee -a "$LOG"

log "bench/sm90_gemm.py"
timeout $(( $(left) - 10 )) python3 bench/sm90_gemm.py --json "$OUT/sm90_gemm.json" "${BENCH_ARGS[@]}" \
  >"$OUT/sm90_bench.log" 2>&1
echo "bench rc=$?" | tee -a "$LOG"
log done
cat "$LOG" | tail -30
sed -n '/^=\{20,\}/,$p' "$OUT/sm90_bench.log"
