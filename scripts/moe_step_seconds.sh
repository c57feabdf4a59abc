#!/usr/bin/env bash
# Seconds per training step of the upcycling recipe's dense model and of its
# mixture-of-experts form (4 experts, top 2, every layer; configs/demo/
# grow-*.toml) on this machine, evaluation off: dense, MoE without the
# balancing loss, with it counted per micro-batch, and counted over the
# step (which routes the step once more without gradients first). The arms
# are timed alternately ROUNDS times (default 3); each timing goes to stderr
# and the medians to stdout, with each arm's tokens/s against dense.
#
#   scripts/moe_step_seconds.sh [BIN_DIR] [ROUNDS] [GRAD_ACCUM]   # default: target/release, 3, 1
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$repo/target/release}"
rounds="${2:-3}"
accum="${3:-1}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
arms=(dense none micro global)
declare -A times
for round in $(seq "$rounds"); do
  for arm in "${arms[@]}"; do
    sets=(--set train.steps=40 --set train.eval_every=0 --set train.warmup_steps=5
      --set "train.grad_accum=$accum")
    case "$arm" in
      dense) ;;
      none) sets+=(--set model.moe.experts=4 --set model.moe.top_k=2 --set moe.balance_weight=0) ;;
      micro) sets+=(--set model.moe.experts=4 --set model.moe.top_k=2 --set 'moe.balance="micro"') ;;
      global) sets+=(--set model.moe.experts=4 --set model.moe.top_k=2 --set 'moe.balance="global"') ;;
    esac
    rm -rf "$work/$arm"
    "$bin/pretrain" --config "$repo/configs/demo/grow-model.toml" \
      --config "$repo/configs/demo/grow-train.toml" "${sets[@]}" \
      --out "$work/$arm" > /dev/null 2>&1
    # The mean over steps 10..40 (the first steps warm caches up).
    s="$(python3 - "$work/$arm/metrics.jsonl" <<'PY'
import json, sys
t = [json.loads(l) for l in open(sys.argv[1]) if '"train/loss"' in l]
a = next(l for l in t if l["step"] == 10)
b = t[-1]
print(f'{(b["elapsed_seconds"] - a["elapsed_seconds"]) / (b["step"] - 10):.4f}')
PY
)"
    echo "round $round, $arm: $s s/step" >&2
    times[$arm]="${times[$arm]:-} $s"
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
dense="$(median ${times[dense]})"
for arm in "${arms[@]}"; do
  m="$(median ${times[$arm]})"
  echo "$arm: $m s/step, tokens/s $(python3 -c "print(f'{$dense / $m:.2f}')")× dense"
done
