#!/usr/bin/env bash
# Parallelism on the device's GPUs (issue 5): the equivalence proof with NCCL, and the numbers.
#
#   bash bench/parallel_gpu.sh equivalence throughput   # ≤ 9.5 min on 4×H200: proof + proxy ep1/ep2/ep4
#   bash bench/parallel_gpu.sh largest                  # ≤ 9 min: the full 16B preset, ep4 + ZeRO, on 4 GPUs
#   EPS="4" ROUTING="forced mock text" bash bench/parallel_gpu.sh throughput   # the three routing modes side by side
# ROUTING (default "mock"): mock tokens, forced balance (model.moe.force_balanced_routing), real text (TEXT, default
# data/bench-tekken from bench/prepare_bench_text.py; carry it); each result has the expert-load min/max.
#
# Runs on a bare device machine (python3 with torch + CUDA, no internet): megatron-core is installed from
# the wheel carried in .whl/ (run with carry [".whl"]) if it is not importable. Results go to $OUT
# (equivalence_gpu.json, throughput_ep*.json, largest.json, parallel_gpu.log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/parallel_gpu}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/parallel_gpu.log"
# never use NVLink multicast on the shared hosts (device README)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}

log() { echo "$@" | tee -a "$LOG"; }

if ! $PY -c "import megatron.core" 2>/dev/null; then
  wheel=$(ls .whl/megatron_core-0.16.1-*cp312*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then log "megatron-core is not installed and no .whl/megatron_core-0.16.1-*cp312*.whl was carried"; exit 1; fi
  $PY -m pip install --no-index --no-deps --quiet "$wheel" 2>&1 | tail -2 | tee -a "$LOG"
fi
for mod in yaml psutil numpy; do
  $PY -c "import $mod" 2>/dev/null || { log "missing python package: $mod (carry its wheel in .whl/)"; exit 1; }
done
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
log "gpus: $NGPU | torch $($PY -c 'import torch; print(torch.__version__)') | megatron-core $($PY -c 'import megatron.core as m; print(m.__version__)' 2>/dev/null)"

run_layout() {  # name, seconds, model, extra args...: one torchrun of bench/parallel_throughput.py
  local name=$1 limit=$2 model=$3; shift 3
  log "== $name ($model $*)"
  timeout "$limit" $PY -m torch.distributed.run --nproc-per-node "$NGPU" --master-port $((29500 + RANDOM % 1000)) \
    bench/parallel_throughput.py --model "$model" --json "$OUTDIR/$name.json" "$@" 2>&1 \
    | grep -v -i "warning" | grep -E "RESULT|Error|error|Traceback|out of memory" | tail -5 | tee -a "$LOG"
}

status=0
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(equivalence throughput)
for mode in "${modes[@]}"; do
  case $mode in
    equivalence)
      log "== equivalence (fp32, NCCL) against one GPU"
      timeout 280 $PY bench/parallel_equivalence_gpu.py --work /tmp/engmoe_eq_gpu --json "$OUTDIR/equivalence_gpu.json" \
        2>&1 | tee -a "$LOG" || status=1
      ;;
    throughput)
      # proxy preset (EngGPT2 layer dims, 4 layers), seq 4096, 4 micro-batches of 1 per data-parallel rank,
      # bf16 autocast, ZeRO; ep1 = plain data parallel over all GPUs, ep>1 folds the experts over them
      for ep in ${EPS:-1 2 4}; do
        [ "$ep" -le "$NGPU" ] || continue
        for routing in ${ROUTING:-mock}; do
          case $routing in
            mock) extra=(); suffix="" ;;
            forced) extra=(--set model.moe.force_balanced_routing=true); suffix="_forced" ;;
            text) extra=(--text "${TEXT:-data/bench-tekken}"); suffix="_text" ;;
            *) log "unknown routing $routing (forced | mock | text)"; status=1; continue ;;
          esac
          run_layout "throughput_ep$ep$suffix" 200 proxy --set parallel.expert=$ep --steps 10 --warmup 3 "${extra[@]}"
        done
      done
      $PY - "$OUTDIR" <<'PY' | tee -a "$LOG"
import glob, json, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/throughput_ep*.json"))]
for r in rows:
    same = [b for b in rows if b["layout"].endswith("ep1") and b.get("data") == r.get("data")
            and b.get("forced_balance") == r.get("forced_balance")]
    base = same[0] if same else None
    rel = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x ep1" if base else ""
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    routing = "forced" if r.get("forced_balance") else r.get("data", "mock")
    load = (f"load {r['expert_load_min']:.2f}/{r['expert_load_max']:.2f}"
            if r.get("expert_load_min") is not None else "load n/a")
    print(f"{r['layout']:<26} {routing:<6} {r['tokens_per_s_per_gpu']:>9.0f} tok/s/GPU ({rel}) | "
          f"{r['tflops_per_gpu']:.1f} TFLOP/s/GPU | MFU {mfu} | all-to-all {100 * r['a2a_share']:.1f}% of step | {load} | "
          f"{r['max_mem_gib']:.1f} GiB | {r['gpu']}")
PY
      ;;
    largest)
      # the full 16B preset on 4 GPUs: experts sharded 4-way, ZeRO over the dense part, seq 4096
      run_layout largest 540 enggpt2-16b-a3b --set parallel.expert=$NGPU --micro-batches 2 --steps 3 --warmup 2
      ;;
    *) log "unknown mode $mode (equivalence | throughput | largest)"; status=1 ;;
  esac
done
exit $status
