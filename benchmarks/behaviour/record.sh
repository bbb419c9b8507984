#!/usr/bin/env bash
# Records metrics.json of short digits runs that cover every method and engine option, so that
# a refactor of the trainer can be shown to change nothing: run it before and after, then
# `python benchmarks/behaviour/same.py BEFORE AFTER` (timings, dates and paths left out).
# Usage: benchmarks/behaviour/record.sh OUT_DIR [PYTHON]; EXTRA_FLAGS adds flags to every run
# (e.g. EXTRA_FLAGS="--precision fp32" to record later code at the old default precision).
set -euo pipefail
out=${1:?usage: record.sh OUT_DIR [PYTHON]}
py=${2:-python}
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
common=(--dataset digits --epochs 2 --threads 1 --device cpu --progress off --seed 3 ${EXTRA_FLAGS:-})
train() { name=$1; shift; "$py" -m orc_fast.train "${common[@]}" --out "$out/$name" "$@" > "$out/$name.log" 2>&1; }
train pivot --method independent --num-nets 1 --arch resnet14
train orc_peer
train orc_peer_mixup_refresh --error-mixup --refresh-teachers --rank-momentum 0.5 --rank-by ce
train orc_pivot --pivot "$out/pivot"
train orc_pivot_frozen --pivot "$out/pivot" --freeze-pivot --promote 2
train kd --method kd --pivot "$out/pivot"
train dml --method dml
train kdcl --method kdcl
train independent --method independent
train fused --strategy fused
train bf16 --precision bf16
train fp16 --precision fp16 --method kdcl
# --resume after a kill: a 3-epoch run killed once its first checkpoint is on disk, resumed.
"$py" -m orc_fast.train "${common[@]}" --epochs 3 --out "$out/resumed" > "$out/resumed.log" 2>&1 &
pid=$!
while ! "$py" - "$out/resumed/latest.pt" <<'PY' 2>/dev/null; do sleep 0.2; done
import sys, torch
sys.exit(0 if torch.load(sys.argv[1], weights_only=False)["epoch"] >= 1 else 1)
PY
kill -9 $pid || true
wait $pid || true
"$py" -m orc_fast.train "${common[@]}" --epochs 3 --out "$out/resumed" --resume >> "$out/resumed.log" 2>&1
train uninterrupted --epochs 3
# member-parallel over 2 ranks (gloo)
"$py" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 --monitor-interval=0.5 \
    -m orc_fast.train "${common[@]}" --out "$out/member_parallel" > "$out/member_parallel.log" 2>&1
echo "recorded in $out"
