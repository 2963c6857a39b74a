#!/usr/bin/env bash
# The long-context stage on 2 GPUs (issue 7), one device call (≤ ~9 min; run with carry [".whl"]):
#
#   bash bench/long_context_gpu.sh        # BUILD_EXT=1 bash ...: also build engmoe._C first (`cuda` MoE kernels)
#
# 1. GPU 0: pytest -m gpu tests/model/test_packed_isolation_gpu.py (FlexAttention document isolation;
#    flash-attn's tests skip with the reason when it is not installed), while GPU 1 runs
#    bench/long_context_needle.py: the passkey probe on the random-init proxy at 4k/16k/32k/64k with YaRN
#    factor 2 over 32k (bf16: SDPA flash, math kernel disabled), then fp32 at 16k/64k (auto → FlexAttention).
# 2. Both GPUs: bench/long_context_train.py under torchrun, the long-context stage (seq 32768) on the proxy
#    model with context parallelism cp2, mock tokens: plain, then packed documents (mid-training's layout).
# Each part has its own timeout, so one failure leaves the others' numbers. Results in $OUT:
# long_context_gpu.log (summary), isolation_tests.log, needle.json, needle.log, train_cp2_plain.json,
# train_cp2_packed.json, train.log. LC_SMOKE=1 checks the plumbing on a CPU machine (tiny model, gloo,
# short sequences; the GPU tests skip).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/long_context_gpu}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/long_context_gpu.log
START=$(date +%s)
DEADLINE=${DEADLINE:-540}  # seconds for the whole script (the device allows 600 per command)
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
log() { echo "=== +$(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }
# never use NVLink multicast on the shared hosts (device README)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}

log start
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
if ! $PY -c "import megatron.core" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "
import importlib.util as u, torch, megatron.core as m
print('torch', torch.__version__, '| megatron-core', m.__version__, '| gpus', torch.cuda.device_count(),
      '| flash_attn', u.find_spec('flash_attn') is not None, '| triton', u.find_spec('triton') is not None)
" 2>&1 | tail -1 | tee -a "$LOG"
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
[ "$NGPU" -ge 2 ] || log "WARNING: $NGPU GPU(s): the cp2 runs need 2"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
if [ "${LC_SMOKE:-0}" = 1 ]; then
  MODEL=tiny NPROC=2 SEQ=256 TRAIN_ARGS="--seq 256"
  NEEDLE_BF16="--lengths 512 1024 --yarn-original 512" NEEDLE_FP32="--lengths 512 --yarn-original 512"
else
  MODEL=proxy NPROC=$NGPU SEQ=32768 TRAIN_ARGS=""
  NEEDLE_BF16="--lengths 4096 16384 32768 65536" NEEDLE_FP32="--lengths 16384 65536"
fi
BUILD=""
if [ "${BUILD_EXT:-0}" = 1 ]; then  # opt-in: engmoe._C (the `cuda` MoE kernels) built while part 1 runs
  ( ENGMOE_CUDA_ARCHS=90a MAX_JOBS=8 timeout 240 $PY setup.py build_ext --inplace >/tmp/engmoe_build.log 2>&1
    echo "build_ext rc=$?" >>/tmp/engmoe_build.log ) &
  BUILD=$!
fi

# -- 1. GPU tests on GPU 0, needle probe on GPU 1, side by side ---------------------------------------
log "isolation tests (GPU 0) | needle probe (GPU 1)"
( CUDA_VISIBLE_DEVICES=0 timeout 200 $PY -m pytest -q -m gpu tests/model/test_packed_isolation_gpu.py \
    -p no:cacheprovider $XDIST -rfEs >"$OUTDIR/isolation_tests.log" 2>&1
  echo "pytest rc=$?" >>"$OUTDIR/isolation_tests.log" ) &
TESTS=$!
( export CUDA_VISIBLE_DEVICES=$(( NGPU > 1 ? 1 : 0 ))
  timeout 110 $PY bench/long_context_needle.py --model $MODEL --dtype bf16 $NEEDLE_BF16 \
    --depths 0 0.5 1 --samples 1 --json "$OUTDIR/needle.json" >"$OUTDIR/needle.log" 2>&1
  echo "needle bf16 rc=$?" >>"$OUTDIR/needle.log"
  # fp32: SDPA has no fused GQA kernel for fp32, so auto takes FlexAttention (the CLI's default dtype)
  timeout 100 $PY bench/long_context_needle.py --model $MODEL --dtype fp32 $NEEDLE_FP32 --depths 0.5 --samples 1 \
    --json "$OUTDIR/needle_fp32.json" >>"$OUTDIR/needle.log" 2>&1
  echo "needle fp32 rc=$?" >>"$OUTDIR/needle.log" ) &
NEEDLE=$!
wait $TESTS
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|pytest rc" "$OUTDIR/isolation_tests.log" | tail -25 | tee -a "$LOG"
wait $NEEDLE
grep -E "^RESULT|^model|rc=|Error" "$OUTDIR/needle.log" | tail -14 | tee -a "$LOG"
# one JSON for both probe runs (at most a few files come back)
$PY - "$OUTDIR" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
d = sys.argv[1]
runs = [json.load(open(os.path.join(d, f))) for f in ("needle.json", "needle_fp32.json") if os.path.exists(os.path.join(d, f))]
if runs:
    json.dump({"runs": runs}, open(os.path.join(d, "needle.json"), "w"), indent=1)
if os.path.exists(os.path.join(d, "needle_fp32.json")):
    os.remove(os.path.join(d, "needle_fp32.json"))
PY

# -- 2. cp2 training steps at 32k on both GPUs ----------------------------------------------------------
if [ -n "$BUILD" ]; then
  wait $BUILD
  tail -2 /tmp/engmoe_build.log | tee -a "$LOG"
fi
run_train() {  # variant, seconds
  local variant=$1 limit=$2
  [ "$limit" -gt 30 ] || { log "train $variant: skipped, ${limit}s left"; return; }
  log "train $variant (cp$NPROC, seq $SEQ, $MODEL, ${limit}s)"
  echo "=== train $variant" >>"$OUTDIR/train.log"
  timeout "$limit" $PY -m torch.distributed.run --nproc-per-node "$NPROC" --master-port $((29500 + RANDOM % 1000)) \
    bench/long_context_train.py --model $MODEL $TRAIN_ARGS --variant "$variant" --global-batch 2 --warmup 2 --steps 4 \
    --json "$OUTDIR/train_cp${NPROC}_$variant.json" 2>&1 | grep -v -i "warning" >>"$OUTDIR/train.log"
  local rc=${PIPESTATUS[0]}
  echo "train $variant rc=$rc$([ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$OUTDIR/train.log" "$LOG"
  sed -n "/^=== train $variant\$/,\$p" "$OUTDIR/train.log" | grep -E "^RESULT|^step|Error|error:|out of memory" \
    | tail -8 | tee -a "$LOG"
}
run_train plain $(( $(left) > 340 ? 200 : $(left) / 2 ))
run_train packed $(( $(left) - 10 ))

log "summary"
$PY - "$OUTDIR" "$NPROC" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
d, n = sys.argv[1], sys.argv[2]
for v in ("plain", "packed"):
    f = os.path.join(d, f"train_cp{n}_{v}.json")
    if not os.path.exists(f):
        print(f"train {v}: no result"); continue
    r = json.load(open(f))
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"train {v:<6} {r['layout']} seq {r['seq']} gb {r['global_batch']}: step {r['step_s']:.2f} s | "
          f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_gpu']:,.0f}/GPU) | {r['tflops_per_gpu']:.1f} TFLOP/s/GPU | "
          f"MFU {mfu} | peak {' / '.join(f'{x:.1f}' for x in r['peak_mem_gib_per_rank'])} GiB | "
          f"warm-up steps {', '.join(f'{x:.1f}' for x in r['warmup_step_s'])} s | {r['gpu']}")
    print(f"  attention: {r['attention_calls_first_step_per_rank']}")
f = os.path.join(d, "needle.json")
if os.path.exists(f):
    for run in json.load(open(f)).get("runs", []):
        for row in run["lengths"]:
            what = f"accuracy {row['accuracy']:.2f}" if row.get("accuracy") is not None else row.get("error", "?")[:100]
            print(f"needle {run['dtype']} {row['length']:>6}: {what} | {row['seconds']:.1f} s | "
                  f"peak {row['peak_mem_gib']:.1f} GiB | {row['attention_calls']}")
PY
log done
