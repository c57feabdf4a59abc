#!/usr/bin/env bash
# The data of recipes/blur.toml: 3000 generated tasks (SFT conversations; seed 7,
# the train split that avoids the held-out set sft and align evaluate on) and
# their rules pairs (chosen: the answer; rejected: a corrupted answer), in
# recipes/blur-data/. BATON (default: baton on PATH) is the binary to use.
set -euo pipefail
cd "$(dirname "$0")/.."
BATON=${BATON:-baton}
mkdir -p recipes/blur-data
"$BATON" data tasks --count 3000 --seed 7 --heldout 30 --out recipes/blur-data/tasks.jsonl --force
"$BATON" data pairs --rules --tasks recipes/blur-data/tasks.jsonl --out recipes/blur-data/pairs.jsonl --force
wc -l recipes/blur-data/*.jsonl
