#!/usr/bin/env bash
# The GPU rows in one prepared run on a CUDA machine:
#
#     tools/gpu_rows.sh OUT_DIR [SECONDS]
#
# Runs, in order of value, each step under its own time limit so that a slow step costs
# only itself, within SECONDS in all (default 540; the whole list wants about 900):
#   0. pytest -m cuda: the CUDA-only tests (fused mixer weights on the GPU, EMA and batch
#      drawing without host syncs under torch.cuda.set_sync_debug_mode);
#   1. nas.bench.run --device cuda, eager sections (fast paths, iFormer blocks, sampling; then
#      training MFU and memory in a second process) and its target rows;
#   2. meme.speed.latency of meme-table4, LDM-S and LDM-L at batch 1 and 32 (ms per step);
#   3. nas.space.latency_table report on meme_ffhq256 and fmnist32 (the latency model against
#      whole-network timings of 30 random candidates, on this GPU);
#   4. nas.bench.run --only sampling --compile (compile time, compiled sampling ratio).
# Every log, CSV, report and the updated BENCHMARKS.md go to OUT_DIR/w, packed into
# OUT_DIR/gpu-rows.tgz at the end. Multi-GPU rows (DDP throughput) need more than one GPU.
#
# Durations seen on one H200 (2026-12-04, results/curated/gpu-h200-2026-12-04): fast paths +
# iFormer + sampling about 150 s (before the per-stage mixer rows), training + memory 80 s (3 steps x 4 runs), each meme.speed.latency
# 12-25 s, the fmnist32 report 44 s; the default space's report needs more than 200 s (its
# first pass over 77 experts alone took 138 s), so it runs with one pass and 2 calibrations.
set -u
OUT=$(realpath -m "${1:?usage: tools/gpu_rows.sh OUT_DIR [SECONDS]}")
cd "$(dirname "$0")/.."                      # the checkout: python -m finds meme/ and nas/
TOTAL=${2:-540}
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

step cuda-tests 60 $PY -m pytest -q -m cuda -p no:cacheprovider tests/meme/speed/test_cuda.py
step bench 200 $PY -m nas.bench --device cuda --only fastpath,sampling \
  --out "$W" --md "$W/BENCHMARKS.md"
step bench-training 120 $PY -m nas.bench --device cuda --only training,memory --train-steps 3 --repeats 3 \
  --out "$W" --md "$W/BENCHMARKS.md"
for m in meme-table4 ldm-s ldm-l; do
  step "latency-$m" 40 $PY -m meme.speed.latency "$m" --device cuda --batch 1,32 --repeats 20 --warmup 5
done
step report-meme_ffhq256 300 $PY -m nas.space.latency_table report --space meme_ffhq256 --device cuda --n 30 \
  --passes 1 --calibrations 2 \
  --out "$W/latency-meme-ffhq256"
step report-fmnist32 100 $PY -m nas.space.latency_table report --space fmnist32 --device cuda --n 30 \
  --out "$W/latency-fmnist32"
step bench-compile 400 $PY -m nas.bench --device cuda --only sampling --compile \
  --out "$W" --md "$W/BENCHMARKS.md"

rm -rf "$W/macs-cache"
tar czf "$OUT/gpu-rows.tgz" -C "$W" .
echo "done at +$(( $(date +%s) - START )) s; failed steps: ${FAILED:-none}"
[ -z "${FAILED:-}" ]
