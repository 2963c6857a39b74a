#!/usr/bin/env bash
# Device call for issue 16 (1 GPU, < 5 min): (1) seconds a proxy checkpoint blocks training, sync save vs
# stage.async_save (bench/checkpoint_bench.py), (2) a SIGTERM pre-emption through torchrun (python -m
# engmoe.elastic, the SLURM template's launcher and shutdown timeout) during a sync proxy save that takes
# longer than torchrun's default 30 s grace period. One ~37 GB checkpoint on disk at a time. Results in $OUT.
#   bash bench/checkpoint_gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/engmoe_out}; mkdir -p "$OUT"
CKPT=${CKPT:-/tmp/engmoe_ckpt}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
df -h /tmp | tail -1 | tee "$OUT/disk.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import psutil" || { echo "psutil missing: megatron's checkpoint writer needs it"; exit 1; }

# (1) blocked seconds per checkpoint, sync vs async
timeout 300 torchrun --nproc-per-node 1 --master-port 29571 bench/checkpoint_bench.py --save-dir "$CKPT/bench" \
  --out "$OUT/checkpoint_bench.json" 2>&1 | grep -v -i "warn" | tee "$OUT/checkpoint_bench.log" | grep -E "^\{|^ |saved|scheduled|Error|error"
rm -rf "$CKPT/bench"

# (2) pre-emption: SIGTERM to the launcher after step 2, a sync save (~60 s) under the template's timeout (270 s)
RUN="$CKPT/preempt"; rm -rf "$RUN"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$(python3 -c "from engmoe.slurm import shutdown_timeout, SIGNAL_LEAD_S; print(shutdown_timeout(SIGNAL_LEAD_S))")
python3 -m engmoe.elastic --nproc-per-node 1 --master-port 29572 launch/pretrain.py --stage 1 --model proxy \
  --set data.mock=true --set data.seq_len=1024 --set parallel.pipeline=1 --set parallel.expert=1 \
  --set parallel.tensor=1 --set parallel.context=1 \
  --set stage.global_batch=2 --set stage.micro_batch=1 --set 'stage.batch_ramp=[]' --set stage.train_steps=1000 \
  --set stage.save_interval=100000 --set stage.eval_interval=100000 --set stage.eval_batches=1 --set stage.log_interval=1 \
  --set stage.tensorboard=false --set model.compile_elementwise=false --set stage.save_dir="$RUN" \
  >"$OUT/preempt.log" 2>&1 &
PID=$!
for _ in $(seq 1 240); do grep -qE "^step +2 \|" "$OUT/preempt.log" 2>/dev/null && break; sleep 1; done
T0=$(date +%s); kill -TERM $PID; wait $PID; RC=$?; T1=$(date +%s)
LATEST=$(cat "$RUN/latest" 2>/dev/null || echo none)
grep -E "stopping at|saved checkpoint|pre-empted|error" "$OUT/preempt.log" | grep -v -i warn
ls "$RUN" > "$OUT/preempt_dir.txt" 2>&1
rm -rf "$RUN"

python3 - "$OUT/checkpoint_bench.json" "$RC" "$LATEST" "$((T1 - T0))" "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1])) if open(sys.argv[1]).read().strip() else {}
rc, latest, secs, timeout = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
print("| measurement | value |\n|---|---:|")
print(f"| checkpoint size (estimate) | {r.get('checkpoint_bytes', 0) / 1e9:.1f} GB |")
print(f"| training step (before saves) | {r.get('step_s', float('nan')):.2f} s |")
print(f"| sync save: step blocked | {r.get('sync_blocked_s', float('nan')):.1f} s |")
print(f"| async save: step blocked | {r.get('async_blocked_s', float('nan')):.1f} s |")
print(f"| async: steps during the write | {', '.join(f'{s:.2f}' for s in r.get('step_s_during_write', []))} s |")
print(f"| async: background write until published | {r.get('async_write_wall_s', float('nan')):.1f} s |")
print(f"| async published, same files as sync | {r.get('async_published')}, {r.get('same_files')} |")
print(f"| pre-emption: launcher rc / latest / SIGTERM→exit | {rc} / {latest} / {secs} s (timeout {timeout} s) |")
PY
