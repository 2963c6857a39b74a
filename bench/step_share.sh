#!/usr/bin/env bash
# Issue 11 on one H200: one GPU's share of the 16B model (ep4-share preset) trained by the real Trainer, before (a
# `git archive` of an earlier commit) / after (this tree) / megatron-core's GPTModel step (.whl/mcore_gpt_step_anchor.py)
# in the same call, three routing modes side by side (forced balance, mock tokens, real text), then one table
# (bench/step_share_table.py). A step at global batch 32 x 4096 takes ~5-8 s, so one ~9-minute call holds one
# micro-batch size: SET=mb1 (default) or SET=mb2 (+ the proxy at micro-batch 4), two calls for the whole table:
#
#   SET=mb1 BEFORE=.whl/before-a05e2ed.tgz bash bench/step_share.sh       # carry [".whl", "data/bench-tekken"]
#   SET=mb2 BEFORE=.whl/before-a05e2ed.tgz bash bench/step_share.sh
#
# BEFORE: tarball of the earlier tree (CPU side: git archive --format=tar.gz -o .whl/before-a05e2ed.tgz a05e2ed);
# without it the before part is skipped. TEXT: folder of bench/prepare_bench_text.py (real text in the Tekken
# tokenizer; default data/bench-tekken). Each part runs under its own time budget (BUDGET_BEFORE, BUDGET_MCORE; the
# after part gets the rest of TOTAL); a variant that would not fit is reported as skipped. AFTER_VARIANTS /
# BEFORE_VARIANTS / MCORE_MB / MCORE_STEPS override the set; GPU_TESTS=1 runs the gpu-marked tests of this change first
# (GPU_TEST_FILES adds files), SKIP_MCORE=1 leaves the anchor out (diagnostic calls). Results: $OUT/{before,after,mcore}.json, logs, $OUT/table.txt.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/step_share}; mkdir -p "$OUT"
S=$(date +%s); TOTAL=${TOTAL:-560}
left() { echo $(( TOTAL - ($(date +%s) - S) )); }
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
TEXT=${TEXT:-data/bench-tekken}
COMMON="${COMMON:---warmup 2 --steps 3 --profile 1} --text $ROOT/$TEXT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

# ---- wheels, builds (grouped_gemm for the anchor in the background, engmoe._C in the foreground) ------------------
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
[ -d /tmp/site_gg/grouped_gemm ] && GG_DONE=1 || GG_DONE=0  # a warm machine keeps it
[ $GG_DONE = 1 ] || ( rm -rf /tmp/gg && mkdir -p /tmp/gg && tar xzf .whl/grouped_gemm-0.3.0.tar.gz -C /tmp/gg \
  && cd /tmp/gg/grouped_gemm-0.3.0 && PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=6 \
  python3 -m pip install --no-build-isolation --no-deps --no-cache-dir --target /tmp/site_gg . ) >"$OUT/gg_build.log" 2>&1 &
GG=$!
build_ext() {  # $1: tree; builds engmoe._C in place (no pip: two trees build at once and must not share an install).
  # With the Hopper GEMM library carried (build/sm90), setup.py's own CUTLASS build of it is skipped: it took
  # minutes of the call per tree and its copy would not be loaded (build/sm90 comes first in the lookup). Today's
  # setup.py skips it by itself (build_sm90.shadowing_library); the variable is for before trees that predate that.
  local skip=0; [ -f "$1/build/sm90/libengmoe_sm90.so" ] && skip=1
  (cd "$1" && PYTHONPATH=/tmp/site ENGMOE_CUDA_ARCHS=90a ENGMOE_SKIP_SM90_BUILD=$skip MAX_JOBS=8 timeout 300 \
     python3 setup.py -q build_ext --inplace)
}
ext_sources_hash() {  # what engmoe._C is built from (csrc/ without csrc/sm90, setup.py): equal hashes, equal builds
  (cd "$1" && cat setup.py $(find csrc -maxdepth 1 -type f \( -name '*.cu' -o -name '*.cpp' -o -name '*.h' \) | sort) \
     | sha256sum | cut -c1-16)
}
# ---- before tree: extracted, then built in the background while this tree builds, or given this tree's engmoe._C
# when its sources are the same (a build costs one to three minutes of the call) ---------------------------------
extract_before() {
  rm -rf /tmp/before && mkdir -p /tmp/before && tar xzf "$BEFORE" -C /tmp/before
  cp bench/proxy_profile.py /tmp/before/bench/
  mkdir -p /tmp/before/configs/model  # the preset is new: give the before tree the same one
  [ -f /tmp/before/configs/model/ep4-share.yaml ] || cp "$(find engmoe configs -name ep4-share.yaml 2>/dev/null | head -1)" \
      /tmp/before/configs/model/
  # the Hopper GEMM library (torch-free, carried prebuilt): the before tree's own Python picks its configurations by
  # name, and the kernels of the names it knows are unchanged, so it runs as it did
  if [ -f build/sm90/libengmoe_sm90.so ]; then mkdir -p /tmp/before/build/sm90 && cp build/sm90/libengmoe_sm90.so /tmp/before/build/sm90/; fi
}
HAVE_BEFORE=0; REUSE_EXT=0; PB=
if [ -n "${BEFORE:-}" ] && [ -f "$BEFORE" ]; then
  HAVE_BEFORE=1; extract_before >"$OUT/build_before.log" 2>&1
  if [ "$(ext_sources_hash /tmp/before)" = "$(ext_sources_hash "$ROOT")" ]; then REUSE_EXT=1
  elif [ -z "${SKIP_BUILD:-}" ]; then ( build_ext /tmp/before; echo "before build rc=$?" ) >>"$OUT/build_before.log" 2>&1 & PB=$!
  fi
fi
if [ -z "${SKIP_BUILD:-}" ] && ! PYTHONPATH=$ROOT:/tmp/site python3 -c "from engmoe.kernels import cuda_ops as c; assert c.load_extension()" 2>/dev/null; then
  build_ext "$ROOT" >"$OUT/build.log" 2>&1; echo "engmoe._C build rc=$? ($(( $(date +%s) - S )) s)"
fi
if [ $REUSE_EXT = 1 ] && [ -z "${SKIP_BUILD:-}" ]; then
  cp "$ROOT"/engmoe/_C*.so /tmp/before/engmoe/ 2>/dev/null
  echo "before build: engmoe._C sources equal this tree's, its build reused (rc=$?)" | tee -a "$OUT/build_before.log"
fi
PYTHONPATH=$ROOT:/tmp/site python3 -c "from engmoe.kernels import cuda_ops as c; print('engmoe ops loaded:', c.load_extension(), c.load_error())"

# ---- optional: this change's GPU tests first (GPU_TESTS=1; ~1-2 min, taken from the after part's budget) ----------
if [ -n "${GPU_TESTS:-}" ]; then
  PYTHONPATH=$ROOT:/tmp/site timeout 200 python3 -m pytest -q -m gpu tests/model/test_cuda_graphs.py \
    tests/training/test_host_sync_gpu.py ${GPU_TEST_FILES:-} -p no:cacheprovider -rfE >"$OUT/gpu_tests.log" 2>&1
  tail -25 "$OUT/gpu_tests.log"
fi

# ---- variants (name -> overrides; bench.* keys are the benchmark's: bench.data=text, bench.model=proxy) -------------
declare -A V=(
  [forced-mb1]="stage.micro_batch=1,model.moe.force_balanced_routing=true"
  [mock-mb1]="stage.micro_batch=1"
  [text-mb1]="stage.micro_batch=1,bench.data=text"
  [forced-mb2]="stage.micro_batch=2,model.moe.force_balanced_routing=true"
  [mock-mb2]="stage.micro_batch=2"
  [text-mb2]="stage.micro_batch=2,bench.data=text"
  [mock-mb1-accum-sm90]="stage.micro_batch=1,model.moe.expert_wgrad_accum=sm90"
  [mock-mb2-accum-sm90]="stage.micro_batch=2,model.moe.expert_wgrad_accum=sm90"
  [mock-mb1-sm90]="stage.micro_batch=1,model.moe.kernel_backend=sm90"
  [forced-mb1-accum-sm90]="stage.micro_batch=1,model.moe.force_balanced_routing=true,model.moe.expert_wgrad_accum=sm90"
  [text-mb1-accum-sm90]="stage.micro_batch=1,bench.data=text,model.moe.expert_wgrad_accum=sm90"
  [forced-mb2-accum-sm90]="stage.micro_batch=2,model.moe.force_balanced_routing=true,model.moe.expert_wgrad_accum=sm90"
  [text-mb2-accum-sm90]="stage.micro_batch=2,bench.data=text,model.moe.expert_wgrad_accum=sm90"
  [mock-mb1-graphs]="stage.micro_batch=1,model.cuda_graphs=attention"
  [forced-mb1-graphs]="stage.micro_batch=1,model.moe.force_balanced_routing=true,model.cuda_graphs=attention"
  [mock-mb2-graphs]="stage.micro_batch=2,model.cuda_graphs=attention"
  [mock-mb1-graphs-router]="stage.micro_batch=1,model.cuda_graphs=attention_router"
  [mock-mb2-graphs-router]="stage.micro_batch=2,model.cuda_graphs=attention_router"
  [text-mb1-graphs]="stage.micro_batch=1,bench.data=text,model.cuda_graphs=attention"
  [forced-mb2-graphs]="stage.micro_batch=2,model.moe.force_balanced_routing=true,model.cuda_graphs=attention"
  [text-mb2-graphs]="stage.micro_batch=2,bench.data=text,model.cuda_graphs=attention"
  [forced-mb1-graphs-sm90]="stage.micro_batch=1,model.moe.force_balanced_routing=true,model.cuda_graphs=attention,model.moe.gemm_plan=sm90"
  [mock-mb1-graphs-sm90]="stage.micro_batch=1,model.cuda_graphs=attention,model.moe.gemm_plan=sm90"
  [text-mb1-graphs-sm90]="stage.micro_batch=1,bench.data=text,model.cuda_graphs=attention,model.moe.gemm_plan=sm90"
  [forced-mb2-graphs-sm90]="stage.micro_batch=2,model.moe.force_balanced_routing=true,model.cuda_graphs=attention,model.moe.gemm_plan=sm90"
  [mock-mb2-graphs-sm90]="stage.micro_batch=2,model.cuda_graphs=attention,model.moe.gemm_plan=sm90"
  [text-mb2-graphs-sm90]="stage.micro_batch=2,bench.data=text,model.cuda_graphs=attention,model.moe.gemm_plan=sm90"
  [mock-mb1-graphs-accum-sm90]="stage.micro_batch=1,model.cuda_graphs=attention,model.moe.expert_wgrad_accum=sm90"
  [mock-mb2-graphs-accum-sm90]="stage.micro_batch=2,model.cuda_graphs=attention,model.moe.expert_wgrad_accum=sm90"
  [forced-mb1-graphs-swiglu]="stage.micro_batch=1,model.moe.force_balanced_routing=true,model.cuda_graphs=attention,model.moe.swiglu_epilogue=true"
  [mock-mb1-graphs-swiglu]="stage.micro_batch=1,model.cuda_graphs=attention,model.moe.swiglu_epilogue=true"
  [proxy-mb4-graphs]="bench.model=proxy,stage.micro_batch=4,model.cuda_graphs=attention"
  [proxy-mb2]="bench.model=proxy,stage.micro_batch=2"
  [proxy-mb4]="bench.model=proxy,stage.micro_batch=4"
  [proxy-mb2-graphs]="bench.model=proxy,stage.micro_batch=2,model.cuda_graphs=attention"
)
SET=${SET:-mb1}
if [ "$SET" = mb2 ]; then
  D_AFTER="forced-mb2-graphs mock-mb2-graphs text-mb2-graphs mock-mb2 proxy-mb4"; D_BEFORE="mock-mb2"; D_MB="2"
else
  D_AFTER="forced-mb1-graphs mock-mb1-graphs text-mb1-graphs mock-mb1"; D_BEFORE="mock-mb1"; D_MB="1"
fi
AFTER_VARIANTS=${AFTER_VARIANTS:-$D_AFTER}
BEFORE_VARIANTS=${BEFORE_VARIANTS:-$D_BEFORE}  # the before tree has no force_balanced_routing / cuda_graphs
MCORE_MB=${MCORE_MB:-$D_MB}
MODEL=${MODEL:-ep4-share}  # MODEL=tiny EXTRA=data.seq_len=64 SKIP_BUILD=1: a CPU dry run of this script
args() { for n in $1; do printf -- "--variant %s:stage.global_batch=32,%s%s " "$n" "${V[$n]}" "${EXTRA:+,$EXTRA}"; done; }
profile() {  # $1 tree, $2 json name, $3 budget s, $4 variants. One torchrun per variant: a variant's memory (CUDA
  # graph pools, allocator caches, megatron's buffers) ends with its process, so the next one starts from an empty GPU
  local t0 last=0 n spent tv; t0=$(date +%s); mkdir -p "$OUT/$2.parts"; : >"$OUT/$2.log"
  for n in $4; do
    spent=$(( $(date +%s) - t0 ))
    if [ $(( spent + last )) -gt "$3" ]; then
      echo "=== $n: skipped (time budget $3 s, $spent s spent)" | tee -a "$OUT/$2.log"
      printf '[{"variant": "%s", "error": "skipped: time budget"}]' "$n" >"$OUT/$2.parts/$n.json"; continue
    fi
    tv=$(date +%s)
    (cd "$1" && PYTHONPATH=$1:/tmp/site timeout $(( $3 - spent + 150 )) torchrun --nproc-per-node 1 \
       --master-port $((29500 + RANDOM % 500)) bench/proxy_profile.py --model "$MODEL" --out "$OUT/$2.parts/$n.json" \
       $COMMON $(args "$n") 2>&1 | grep -v -i "warn" | tee -a "$OUT/$2.log" | grep -E "^===|^step |busy|still|Error|error" )
    [ -s "$OUT/$2.parts/$n.json" ] || printf '[{"variant": "%s", "error": "no result (process died)"}]' "$n" \
      >"$OUT/$2.parts/$n.json"
    last=$(( $(date +%s) - tv ))
  done
  python3 -c 'import json,sys; print(json.dumps([r for f in sys.argv[2:] for r in json.load(open(f))], indent=1))' \
    _ $(for n in $4; do echo "$OUT/$2.parts/$n.json"; done) >"$OUT/$2.json"
}

# ---- before: the earlier tree runs its own model/trainer code (our harness: bench/proxy_profile.py) ----------------
if [ $HAVE_BEFORE = 1 ]; then
  [ -n "$PB" ] && wait $PB; tail -1 "$OUT/build_before.log"
  echo "== before ($BEFORE), $(left) s left"
  profile /tmp/before before "${BUDGET_BEFORE:-80}" "$BEFORE_VARIANTS"
else
  echo "== before: skipped (BEFORE=${BEFORE:-unset} is not a file)"
fi

# ---- after: this tree ------------------------------------------------------------------------------------------
B=$(( $(left) - ${BUDGET_MCORE:-110} )); B=${BUDGET_AFTER:-$B}
echo "== after, budget $B s ($(left) s left)"
profile "$ROOT" after "$B" "$AFTER_VARIANTS"

# ---- megatron-core's GPTModel step at the same dims, same call --------------------------------------------------
wait $GG; echo "grouped_gemm build rc=$? ($(tail -1 "$OUT/gg_build.log" 2>/dev/null | cut -c1-120))"
M=$(( $(left) - 15 ))
echo "== megatron-core anchor, budget $M s"
if [ -n "${SKIP_MCORE:-}" ]; then
  echo "megatron-core anchor skipped: SKIP_MCORE is set"
elif [ "$M" -gt 60 ]; then
  PYTHONPATH=/tmp/site:/tmp/site_gg timeout $(( M + 20 )) python3 .whl/mcore_gpt_step_anchor.py --core-attention sdpa \
    --micro-batch $MCORE_MB ${MCORE_STEPS:---warmup 2 --steps 3} --time-budget "$M" --json "$OUT/mcore.json" >"$OUT/mcore.log" 2>&1
  tail -6 "$OUT/mcore.log"
else
  echo "megatron-core anchor skipped: ${M} s left"
fi
PYTHONPATH=$ROOT python3 bench/step_share_table.py "$OUT" | tee "$OUT/table.txt"
echo "total $(( $(date +%s) - S )) s"
