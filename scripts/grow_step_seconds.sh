#!/usr/bin/env bash
# Seconds per training step of the growth recipe's two sizes (2 and 4 layers,
# configs/demo/grow-*.toml) on this machine, evaluation off: the sizes are
# timed alternately ROUNDS times (default 3) and the medians printed as the
# SMALL,BIG pair that `scripts/recipe_tables.py grow RUN --step-seconds
# SMALL,BIG` turns steps into training time. Each timing goes to stderr, so
# the spread is visible (it is large on a shared 2-core machine).
#
#   scripts/grow_step_seconds.sh [BIN_DIR] [ROUNDS]   # default: target/release, 3
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$repo/target/release}"
rounds="${2:-3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
small=()
big=()
for round in $(seq "$rounds"); do
  for layers in 2 4; do
    rm -rf "$work/l$layers"
    "$bin/pretrain" --config "$repo/configs/demo/grow-model.toml" \
      --config "$repo/configs/demo/grow-train.toml" \
      --set model.n_layers=$layers --set train.steps=60 --set train.eval_every=0 \
      --set train.warmup_steps=5 --out "$work/l$layers" > /dev/null 2>&1
    # The mean over steps 10..60 (the first steps warm caches up).
    s="$(python3 - "$work/l$layers/metrics.jsonl" <<'PY'
import json, sys
t = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
a = next(l for l in t if l["step"] == 10)
b = t[-1]
print(f'{(b["elapsed_seconds"] - a["elapsed_seconds"]) / (b["step"] - 10):.4f}')
PY
)"
    echo "round $round, $layers layers: $s s/step" >&2
    if [ "$layers" = 2 ]; then small+=("$s"); else big+=("$s"); fi
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
echo "$(median "${small[@]}"),$(median "${big[@]}")"
