#!/usr/bin/env bash
# Device call for issue 6's whole-model numbers: install the carried megatron-core wheel, build engmoe._C,
# optionally run the kernels' GPU tests, then bench/proxy_profile.py with the variants given. With
# BEFORE=<tarball of an earlier commit> (git archive) the same script first measures that tree's default
# ("before") in the same call, so before/after is a ratio from one machine state. Results under $OUT.
#   BEFORE=.whl/old.tgz GPU_TESTS="cross_entropy" COMMON="--warmup 3 --steps 6 --profile 1" \
#     bash bench/proxy_profile.sh --variant mb1: --variant mb2:stage.micro_batch=2 ...
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engmoe_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
if ! python3 -c "from engmoe.kernels import cuda_ops as c; assert c.load_extension()" 2>/dev/null; then
  ENGMOE_CUDA_ARCHS=90a MAX_JOBS=14 timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build rc=$?"
fi
python3 -c "from engmoe.kernels import cuda_ops as c; print('engmoe ops loaded:', c.load_extension(), c.load_error())"
if [ -n "${GPU_TESTS:-}" ]; then  # a pytest -k expression
  timeout 240 python3 -m pytest -q -m gpu tests/kernels/test_kernels_gpu.py -k "$GPU_TESTS" -p no:cacheprovider -rfE \
    2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
if [ -n "${BEFORE:-}" ]; then
  rm -rf /tmp/before && mkdir -p /tmp/before && tar xzf "$BEFORE" -C /tmp/before
  cp bench/proxy_profile.py /tmp/before/bench/ && cp engmoe/_C*.so /tmp/before/engmoe/  # same ops, a superset
  (cd /tmp/before && torchrun --nproc-per-node 1 --master-port 29562 bench/proxy_profile.py \
     --out "$OUT/profile_before.json" ${COMMON:-} --variant before: 2>&1 | grep -v -i "warn" | tee "$OUT/profile_before.log")
fi
torchrun --nproc-per-node 1 --master-port 29561 bench/proxy_profile.py --out "$OUT/profile.json" ${COMMON:-} "$@" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/profile.log"
