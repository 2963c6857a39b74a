#!/usr/bin/env bash
# One-GPU training run of the `proxy` preset through the real launcher (issue: trainer numbers).
# Usage on the device:  [MICRO=4] [GLOBAL=32] bash bench/proxy_training.sh [steps]   (logs under ${OUT:-/tmp})
# Mock tokens (throughput only: the numbers do not depend on the text), seq 4096, global batch GLOBAL × 4096
# tokens in micro-batches of MICRO sequences (4 needs ~72 GiB: use MICRO=2 on an 80 GB H100).
set -euo pipefail
STEPS=${1:-300}
MICRO=${MICRO:-4}
GLOBAL=${GLOBAL:-32}
OUTDIR=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUTDIR/gpu.txt"
PYTHONUNBUFFERED=1 torchrun --nproc-per-node 1 --master-port 29555 launch/pretrain.py --stage 1 --model proxy \
  --set data.mock=true --set parallel.pipeline=1 --set parallel.expert=1 \
  --set stage.train_steps="$STEPS" --set stage.global_batch="$GLOBAL" --set 'stage.batch_ramp=[]' --set stage.micro_batch="$MICRO" \
  --set stage.log_interval=25 --set stage.eval_interval=100000 --set stage.eval_batches=1 --set stage.save=false \
  --set stage.save_dir="$OUTDIR/proxy_run" --set optimizer.warmup_steps=50 2>&1 | grep -v -i "warning" | tee "$OUTDIR/proxy_training.log"
python3 - "$OUTDIR/proxy_training.log" <<'PY'
import re, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("step") and "tok/s" in l]
steady = lines[2:] or lines
tps = [float(re.search(r"tok/s (\d+)", l).group(1)) for l in steady]
tf = [float(re.search(r"TFLOP/s/dev ([0-9.]+)", l).group(1)) for l in steady]
mfu = [float(re.search(r"MFU ([0-9.]+)%", l).group(1)) for l in steady]
print(f"proxy steady state over {len(steady)} intervals: {sum(tps)/len(tps):.0f} tok/s, "
      f"{sum(tf)/len(tf):.1f} TFLOP/s/GPU, MFU {sum(mfu)/len(mfu):.1f}%")
PY
