#!/usr/bin/env bash
# One H200 device call: build engmoe._C, run every gpu-marked test, then the async-checkpoint timing
# (bench/checkpoint_bench.py: sync vs async save of the proxy preset). Results under $OUT. Carry [".whl"].
#   bash bench/gpu_checks.sh            # TESTS_S / CKPT_S cap each part (seconds)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engmoe_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 OMP_NUM_THREADS=8
S=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "from engmoe.kernels import cuda_ops as c; assert c.load_extension()" 2>/dev/null; then
  ENGMOE_CUDA_ARCHS=90a MAX_JOBS=14 timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build rc=$? ($(( $(date +%s) - S )) s)"; tail -3 "$OUT/build.log"
fi
# every file with gpu-marked tests (new features first, the kernel suite last)
GPU_TEST_FILES=${GPU_TEST_FILES:-"tests/training/test_host_sync_gpu.py tests/model/test_cuda_graphs.py \
  tests/training/test_grad_fusion_gpu.py tests/parallel/test_a2a_overlap.py tests/model/test_moe_balancing.py \
  tests/model/test_packed_isolation_gpu.py tests/kernels/test_kernels_gpu.py"}
python3 -c "from engmoe.kernels import cuda_ops as c; print('engmoe ops loaded:', c.load_extension(), c.load_error())"
timeout "${TESTS_S:-270}" python3 -m pytest -q -m gpu $GPU_TEST_FILES -p no:cacheprovider -rfE --timeout 120 --continue-on-collection-errors \
  >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$? ($(( $(date +%s) - S )) s)"
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -10
CKPT=/tmp/engmoe_ckpt; rm -rf "$CKPT"
timeout "${CKPT_S:-260}" torchrun --nproc-per-node 1 --master-port 29571 bench/checkpoint_bench.py \
  --save-dir "$CKPT/bench" --out "$OUT/checkpoint_bench.json" 2>&1 | grep -v -i "warn" >"$OUT/checkpoint_bench.log"
echo "checkpoint bench rc=$? ($(( $(date +%s) - S )) s)"; tail -20 "$OUT/checkpoint_bench.log"
rm -rf "$CKPT"
echo "total $(( $(date +%s) - S )) s"
