#!/usr/bin/env bash
# Data-parallel overhead on one machine: 2 ranks × 1 thread (`baton launch`)
# against 1 process × 2 threads, at the same global batch, for a model
# config; prints tokens/s of each and the all-reduce time per step.
#
#   scripts/dp_overhead.sh BIN_DIR CORPUS STEPS [--set k=v …]
#
# BIN_DIR holds release builds of baton and pretrain.
set -euo pipefail
bin=$1 corpus=$2 steps=$3
shift 3
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
common=(--corpus "$corpus" --set "train.steps=$steps" --set train.eval_every=0
  --set train.save_every=0 --set train.log_every=1 --set train.grad_accum=2 "$@")
RAYON_NUM_THREADS=2 "$bin/pretrain" "${common[@]}" --set train.workers=2 \
  --out "$work/one" >/dev/null 2>"$work/one.log" || { tail -3 "$work/one.log"; exit 1; }
"$bin/baton" launch --nproc-per-node 2 --threads 1 --master-port "${PORT:-29800}" -- \
  pretrain "${common[@]}" --set train.workers=1 --out "$work/two" >/dev/null 2>"$work/two.log" || { tail -3 "$work/two.log"; exit 1; }
python3 - "$work" <<'PY'
import json, sys, statistics
work = sys.argv[1]
def run(name):
    lines = [json.loads(l) for l in open(f"{work}/{name}/metrics.jsonl")]
    steps = [l for l in lines if "train/loss" in l]
    # Steady state: the first two steps pay one-off costs.
    t = [b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(steps[1:], steps[2:])]
    tokens = steps[1]["tokens_seen"] - steps[0]["tokens_seen"]
    ar = [l["allreduce_seconds"] for l in steps[2:] if "allreduce_seconds" in l]
    m = json.load(open(f"{work}/{name}/manifest.json"))
    return statistics.median(t), tokens, (statistics.median(ar) if ar else None), m["metrics"]["params"]
one = run("one"); two = run("two")
print(f"params {int(one[3])}  tokens/step {one[1]}  f32 gradient bytes/step {int(one[3])*4}")
print(f"1 process x 2 threads : {one[0]*1e3:8.1f} ms/step  {one[1]/one[0]:9.0f} tok/s")
print(f"2 ranks x 1 thread    : {two[0]*1e3:8.1f} ms/step  {two[1]/two[0]:9.0f} tok/s  all-reduce {two[2]*1e3:.1f} ms/step ({100*two[2]/two[0]:.0f} % of the step)")
print(f"ratio (2 ranks / 1 process tok/s): {one[0]/two[0]:.2f}")
PY
