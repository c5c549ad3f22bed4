#!/usr/bin/env bash
# The GPU rows in one prepared run on a CUDA machine:
#
#     tools/gpu_rows.sh OUT_DIR [SECONDS]
#
# Runs, in order of value, each step under its own time limit so that a slow step costs
# only itself, within SECONDS in all (default 480: 8 minutes):
#   0. pytest -m cuda: the CUDA-only tests (CUDA-graph sampling equal to eager, captured once
#      per expert and batch size and refused outside its plan; GroupNorm without an fp32
#      copy; fused mixer weights; EMA and batch drawing without host syncs under
#      torch.cuda.set_sync_debug_mode; how many proxy trials one GPU holds);
#   1. nas.bench --only sampling: meme-table4, LDM-S and LDM-L at batch 1, 8, 32 and 128,
#      eager and from CUDA graphs, interleaved, 5 repeats (20 DDIM steps per run): each
#      model's graph gain, the eager/eager and best/best ratios against the targets;
#   2. nas.bench --only training,memory: training MFU of an iU-Net expert at batch 64 and
#      256 (and LDM-S at 64), normal against low-memory sampling memory;
#   3. a 60 s search of the tiny space with the Optuna engine on this GPU: trials at
#      once as measured (nas.evaluators.device_share) and candidates per minute;
#   4. nas.space.latency_table report on fmnist32: the latency model (timed as CUDA-graph
#      replays, as the sampler runs) against whole-network timings of 30 candidates;
#   5. nas.bench --only sampling --compile: compile time and compiled + graph sampling;
#   6. nas.bench --only fastpath: fast paths, iFormer blocks, mixers (its rows beside the
#      H200's of 2026-12-04);
#   7. meme.speed.latency of meme-table4, LDM-S and LDM-L at batch 1 and 32 (ms per step).
# Every log, CSV, report and the updated BENCHMARKS.md go to OUT_DIR/w, packed into
# OUT_DIR/gpu-rows.tgz at the end. Multi-GPU rows (DDP throughput) need more than one GPU.
#
# Durations seen on one H200 (2026-12-04, results/curated/gpu-h200-2026-12-04, before the
# CUDA-graph path): fast paths + iFormer + sampling about 150 s, training + memory 80 s
# (3 steps x 4 runs), each meme.speed.latency 12-25 s, the fmnist32 report 44 s. This
# version has not yet run on a GPU: the limits below are estimates, and a step that
# overruns is cut and named, the rest still run.
set -u
OUT=$(realpath -m "${1:?usage: tools/gpu_rows.sh OUT_DIR [SECONDS]}")
cd "$(dirname "$0")/.."                      # the checkout: python -m finds meme/ and nas/
TOTAL=${2:-480}
W=$OUT/w
mkdir -p "$W"
export PYTHONUNBUFFERED=1 MEME_LATENCY_CACHE=$W/latency-cache MEME_MACS_CACHE=$W/macs-cache
PY=${PYTHON:-python3}
START=$(date +%s)
cp results/BENCHMARKS.md "$W/BENCHMARKS.md"

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

step() {   # step NAME LIMIT_S CMD...: run CMD with min(LIMIT_S, time left - 15 s)
  local name=$1 limit=$2; shift 2
  local l; l=$(left); l=$(( l - 15 < limit ? l - 15 : limit ))
  if [ "$l" -lt 20 ]; then echo "== $name: skipped, $(left) s left"; return; fi
  echo "== $name (limit ${l}s) at +$(( $(date +%s) - START )) s"
  timeout -k 5 "$l" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || FAILED="${FAILED:-}${FAILED:+ }$name"
  echo "   rc=$rc after +$(( $(date +%s) - START )) s"
  tail -n 4 "$W/$name.log" | cut -c1-240
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$W/nvidia-smi.txt" 2>&1
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$W/versions.txt"

step cuda-tests 90 $PY -m pytest -q -m cuda -p no:cacheprovider tests/meme/speed/test_cuda.py
step bench-sampling 160 $PY -m nas.bench --device cuda --only sampling --steps 20 --repeats 5 \
  --out "$W" --md "$W/BENCHMARKS.md"
step bench-training 90 $PY -m nas.bench --device cuda --only training,memory --train-steps 3 --repeats 3 \
  --out "$W" --md "$W/BENCHMARKS.md"
step search-60s 90 $PY -m nas.search --space tiny --executor optuna --device cuda --budget-gflops 1 \
  --trials 1000 --time-budget 60 --no-reference --rerank-top 0 --quiet --out "$W/search"
step report-fmnist32 80 $PY -m nas.space.latency_table report --space fmnist32 --device cuda --n 30 \
  --out "$W/latency-fmnist32"
step bench-compile 150 $PY -m nas.bench --device cuda --only sampling --compile --steps 20 --sampling-batches 32 \
  --out "$W" --md "$W/BENCHMARKS.md"
step bench-fastpath 150 $PY -m nas.bench --device cuda --only fastpath --out "$W" --md "$W/BENCHMARKS.md"
for m in meme-table4 ldm-s ldm-l; do
  step "latency-$m" 30 $PY -m meme.speed.latency "$m" --device cuda --batch 1,32 --repeats 20 --warmup 5
done

rm -rf "$W/macs-cache"
tar czf "$OUT/gpu-rows.tgz" -C "$W" .
echo "done at +$(( $(date +%s) - START )) s; failed steps: ${FAILED:-none}"
[ -z "${FAILED:-}" ]
