#!/usr/bin/env bash
# One device call (see bench/KERNEL_NOTES.md): install the carried wheels, build engmoe._C (setup.py, sm_90a)
# and grouped_gemm (sdist), run the GPU tests, the megatron-core anchor and bench/moe_layer.py in the same
# process tree, then compute-sanitizer on the small cases with the time that is left.
# Needs in .whl/ (git-ignored, carried): megatron_core-0.16.1 cp312 wheel, grouped_gemm-0.3.0.tar.gz,
# mcore_moe_anchor.py (copied from ../shared/bench/).
#   bash tests/kernels/device_run.sh [--skip-tests] [--skip-bench] [bench args...]
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/engmoe_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/run.log
START=$(date +%s)
DEADLINE=${DEADLINE:-560}  # seconds for the whole script (the device allows 600 per command)
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
log() { echo "=== +$(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }
SKIP_TESTS=0; SKIP_BENCH=0; BENCH_ARGS=()
for a in "$@"; do
  case $a in --skip-tests) SKIP_TESTS=1;; --skip-bench) SKIP_BENCH=1;; *) BENCH_ARGS+=("$a");; esac
done

log start
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
export PYTHONPATH=/tmp/site:/tmp/site_gg:$PWD
( rm -rf /tmp/gg && mkdir -p /tmp/gg && tar xzf .whl/grouped_gemm-0.3.0.tar.gz -C /tmp/gg \
  && cd /tmp/gg/grouped_gemm-0.3.0 && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=6 \
  python3 -m pip install --no-build-isolation --no-deps --no-cache-dir --target /tmp/site_gg . ) >"$OUT/gg_build.log" 2>&1 &
GG=$!
# the JIT path (torch.utils.cpp_extension.load of csrc/), from a copy of the sources without the built .so
( rm -rf /tmp/jit && mkdir -p /tmp/jit && cp -r engmoe csrc /tmp/jit/ && rm -f /tmp/jit/engmoe/_C*.so && cd /tmp/jit \
  && ENGMOE_JIT_BUILD=1 TORCH_EXTENSIONS_DIR=/tmp/jit/ext MAX_JOBS=4 PYTHONPATH=/tmp/jit timeout 300 python3 -c "
import torch
from engmoe.kernels import cuda_ops, reference
ok = cuda_ops.load_extension(); print('JIT build loaded:', ok, cuda_ops.load_error())
x = torch.randn(37, 24, device='cuda'); idx = torch.rand(37, 6, device='cuda').topk(2, -1).indices
ss, s2r, c = torch.ops.engmoe.routing_maps(idx, 6)
print('JIT ops match reference:', torch.equal(cuda_ops.permute(x, ss, s2r, 2), reference.permute(x, ss, s2r, 2)))
" ) >"$OUT/jit.log" 2>&1 &
JIT=$!
log "build engmoe._C"
ENGMOE_CUDA_ARCHS=90a MAX_JOBS=10 timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
echo "build rc=$?" | tee -a "$LOG"
grep -E "error|Error|warning" "$OUT/build.log" | grep -v "Wno-" | head -20 | tee -a "$LOG"
python3 -c "from engmoe.kernels import cuda_ops as c; print('engmoe ops loaded:', c.load_extension(), c.load_error())" 2>&1 | tail -2 | tee -a "$LOG"
wait $GG; echo "grouped_gemm build rc=$?" | tee -a "$LOG"
python3 -c "import grouped_gemm; print('grouped_gemm importable')" 2>&1 | tail -1 | tee -a "$LOG"

wait $JIT; echo "jit check rc=$?" | tee -a "$LOG"; grep -E "^JIT|Error" "$OUT/jit.log" | tail -3 | tee -a "$LOG"
if [ $SKIP_TESTS = 0 ]; then
  log "gpu tests"
  timeout 200 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider -n 4 -rfE >"$OUT/tests.log" 2>&1
  echo "pytest rc=$?" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30 | tee -a "$LOG"
fi
if [ $SKIP_BENCH = 0 ]; then
  log "anchor (megatron-core)"
  timeout 200 python3 .whl/mcore_moe_anchor.py --tokens 8192 32768 --json "$OUT/anchor.json" 2>&1 \
    | grep -E "megatron-core MoELayer|Error|error" | tail -8 | tee -a "$LOG"
  log "bench/moe_layer.py"
  timeout $(( $(left) - 40 )) python3 bench/moe_layer.py --anchor "$OUT/anchor.json" --json "$OUT/moe_layer.json" \
    "${BENCH_ARGS[@]}" >>"$LOG" 2>&1
  echo "bench rc=$?" | tee -a "$LOG"
fi
if [ $SKIP_TESTS = 0 ] && [ "$(left)" -gt 45 ]; then
  log "compute-sanitizer memcheck (small cases)"
  timeout $(( $(left) - 10 )) compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/kernels/memcheck_small.py \
    >"$OUT/sanitizer.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$LOG"
  tail -4 "$OUT/sanitizer.log" | tee -a "$LOG"
fi
log done
# the end of the bench output (the summary table) last, for the reply's tail
sed -n '/^=\{20,\}/,$p' "$LOG" | tail -40
