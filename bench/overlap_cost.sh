#!/usr/bin/env bash
# Device call for issue 12 on ONE H200 (ep1): what the overlap switches cost where there is nothing to overlap.
#  1. the proxy preset's training step with parallel.moe_a2a_overlap / parallel.overlap_param_gather off and on,
#     alternating off,on,off,on in one process tree (bench/proxy_profile.py; target: on within 2 % of off);
#  2. the chunked path's GPU test (one GPU, no group) and its compute cost on one MoE layer, no communication
#     (bench/a2a_overlap_cost.py).
# About 2.5 minutes when engmoe._C is already built in the tree (proxy_profile.sh builds it otherwise: +1-4 min).
# Results under $OUT (profile.json / profile.log, gpu_tests.log, a2a_overlap_cost.json / .log).
#   bash bench/overlap_cost.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engmoe_out}; mkdir -p "$OUT"
OFF="parallel.moe_a2a_overlap=false,parallel.overlap_param_gather=false"
COMMON="--warmup 2 --steps 5 --profile 0" timeout 150 bash bench/proxy_profile.sh \
  --variant off:$OFF --variant on: --variant off2:$OFF --variant on2:
PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m pytest -q -m gpu tests/parallel/test_a2a_overlap.py -p no:cacheprovider \
  -rfE 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
PYTHONPATH=/tmp/site:$PWD timeout 45 python3 bench/a2a_overlap_cost.py --tokens 4096 --chunks 2 4 \
  --json "$OUT/a2a_overlap_cost.json" 2>&1 | grep -v -i warn | tee "$OUT/a2a_overlap_cost.log"
