#!/usr/bin/env bash
# KV-cache generation tokens/s and the expert-bias router on one GPU (issue 15), one device call (≤ ~6 min;
# run with carry [".whl"]):
#
#   bash bench/generation_gpu.sh
#
# 1. pytest -m gpu tests/model/test_moe_balancing.py (the biased top-k on CUDA tensors equals the reference;
#    the cuda backend's fused kernel is used without a bias).
# 2. bench/generation_kv_cache.py: cached vs uncached greedy generation, random-init tiny (fp32) and proxy
#    (bf16) at prompts 1024 and 4096. Results in $OUT: generation_gpu.log, generation_kv_cache_*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/generation_gpu}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/generation_gpu.log
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}
log() { echo "=== $*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
if ! $PY -c "import megatron.core" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
log "gpu tests"
timeout 120 $PY -m pytest -q -m gpu tests/model/test_moe_balancing.py 2>&1 | tail -5 | tee -a "$LOG"
run() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  log "$name"
  timeout "$t" $PY bench/generation_kv_cache.py --device cuda --out "$OUTDIR/$name" "$@" 2>&1 | grep -v -i warn | tail -3 | tee -a "$LOG"
}
run tiny_p1024 60 --model tiny --prompt 1024 --new 64
run proxy_p1024 120 --model proxy --dtype bf16 --prompt 1024 --new 64
run proxy_p4096 150 --model proxy --dtype bf16 --prompt 4096 --new 32
log done
