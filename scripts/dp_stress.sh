#!/usr/bin/env bash
# Stress for data-parallel runs: RUNS launches of 2 ranks × 1 thread, each
# ~800 all-reduce sessions (the smoke config, 100 steps, 20 kB buckets), with
# `--max-restarts 3`; every run's weights are compared with one process's
# (`train.grad_accum = 2`). With KILL_AT="12 24", rank 1 is killed (SIGKILL)
# that many seconds into each run.
#
#   scripts/dp_stress.sh BIN_DIR CORPUS RUNS
#
# BIN_DIR holds release builds of baton and pretrain. Prints a line per run:
# exit status, seconds, restarts, sessions found stuck, and the bytes' verdict.
set -uo pipefail
bin=$1 corpus=$2 runs=$3
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
sets=(--config "$repo/configs/smoke/pretrain.toml" --corpus "$corpus" --set train.steps=100
  --set train.eval_every=0 --set train.save_every=10 --set train.log_every=10
  --set train.grad_accum=2 --set train.workers=1)
RAYON_NUM_THREADS=1 "$bin/pretrain" "${sets[@]}" --out "$work/one" >/dev/null 2>"$work/one.log" \
  || { tail -2 "$work/one.log"; exit 1; }
for i in $(seq 1 "$runs"); do
  out="$work/run$i"
  start=$(date +%s.%N)
  BATON_BUCKET_MB=0.02 "$bin/baton" launch --nproc-per-node 2 --threads 1 --grace 5 --max-restarts 3 \
    --master-port "$((${PORT:-31000} + 10 * i))" -- pretrain "${sets[@]}" --out "$out" \
    >/dev/null 2>"$out.log" &
  launcher=$!
  elapsed=0
  for t in ${KILL_AT:-}; do
    sleep "$((t - elapsed))"
    elapsed=$t
    for p in $(pgrep -f -- "--out $out"); do
      if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx RANK=1; then
        echo "  killing rank 1 at ${t} s"
        kill -9 "$p"
      fi
    done
  done
  wait "$launcher"
  rc=$?
  secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  verdict=$(cmp -s "$out/model.safetensors" "$work/one/model.safetensors" && echo "same bytes as one process" || echo DIFFERENT)
  echo "run $i: exit $rc, ${secs} s, restarts $(grep -c 'restart [0-9]' "$out.log"), stuck $(grep -c 'stuck in' "$out.log"), $verdict"
  grep -h "stuck in" "$out.log" | head -2 | sed 's/^/  /'  || true
done
