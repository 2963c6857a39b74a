#!/usr/bin/env bash
# Device call for gradient-accumulation fusion (issue 11): install the carried megatron-core wheel, build
# engmoe._C if needed, run the GPU tests (tests/training/test_grad_fusion_gpu.py), then the weight-gradient
# micro-benchmark (bench/wgrad_fusion.py). With PROFILE=1 also bench/proxy_profile.py with fusion off / on
# (the whole-step effect; the "fp32 grad accumulation (main_grad += grad)" row should vanish). Results in $OUT.
#   bash bench/wgrad_fusion_gpu.sh            # ~2 min with the build; PROFILE=1 adds the two proxy runs
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engmoe_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "from engmoe.kernels import cuda_ops as c; assert c.load_extension()" 2>/dev/null; then
  ENGMOE_CUDA_ARCHS=90a MAX_JOBS=14 timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build rc=$?"
fi
python3 -c "from engmoe.kernels import cuda_ops as c; print('engmoe ops loaded:', c.load_extension(), c.load_error())"
timeout 240 python3 -m pytest -q -m gpu tests/training/test_grad_fusion_gpu.py -p no:cacheprovider -rfE 2>&1 \
  | tail -15 | tee "$OUT/gpu_tests.log"
timeout 180 python3 bench/wgrad_fusion.py --out "$OUT/wgrad_fusion.json" 2>&1 | tee "$OUT/wgrad_fusion.log"
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 300 torchrun --nproc-per-node 1 --master-port 29563 bench/proxy_profile.py --out "$OUT/profile_gaf.json" \
    --warmup 2 --steps 4 --profile 1 --variant gaf_off:model.gradient_accumulation_fusion=false \
    --variant gaf_on:model.gradient_accumulation_fusion=true 2>&1 | grep -v -i "warn" | tee "$OUT/profile_gaf.log"
fi
