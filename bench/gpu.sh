#!/usr/bin/env bash
# The GPU measurements of bench/README.md in one script, for a GPU machine with
# PyTorch and no Rust. Build `versus` with CUDA where Rust is, and put it where
# this script looks:
#
#   cargo build --release -p baton-bench --features cuda --bin versus
#   mkdir -p .gpu && cp target/release/versus .gpu/
#
# then, on the GPU machine, from the repository root:
#
#   bench/gpu.sh OUT_DIR RUN...      RUN: bf16, bf16-warm, f32
#
# Each run trains the 124M config (configs/gpt124m.toml) against PyTorch on the
# same GPU; bf16-warm repeats bf16 in a fresh process whose autotune results
# and compiled kernels are cached on disk (first-step latency, warm).
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR RUN...}
mkdir -p "$out"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
bin=${VERSUS:-.gpu/versus}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"

# cubecl (Burn's GPU runtime) reads cubecl.toml from the working directory up.
# For these runs it also logs the autotune choices (which matmul kernel won,
# per shape) and each kernel compilation; the repository's file is restored
# at exit.
cp cubecl.toml "$out/cubecl.toml.orig"
trap 'cp "$out/cubecl.toml.orig" cubecl.toml' EXIT
cat > cubecl.toml <<TOML
[compilation]
cache = "target"

[autotune]
cache = "target"

[compilation.logger]
level = "basic"
file = "$out/compile.log"

[autotune.logger]
level = "minimal"
file = "$out/autotune.log"
TOML

common=(--config configs/gpt124m.toml --torch-device cuda --peak-size 8192)
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $bin ${common[*]} $*"
    timeout "$limit" "$bin" "${common[@]}" "$@" 2>&1 | tee "$out/$name.txt"
    echo "exit ${PIPESTATUS[0]}"
}
# A cold first step took 256 s on an H200 (bench/README.md): the limits leave
# room for it. 15 minutes of device time hold about two of these runs.
for name in "${@:2}"; do
    case $name in
        bf16) run bf16 360 --dtype bf16 --steps 10 --warmup 4 --rounds 3 ;;
        bf16-warm) run bf16-warm 200 --dtype bf16 --steps 5 --warmup 2 --rounds 1 ;;
        f32) run f32 360 --dtype f32 --steps 10 --warmup 4 --rounds 3 ;;
        *) echo "unknown run $name (bf16, bf16-warm, f32)" >&2 ;;
    esac
done
du -sh target/* 2>/dev/null
