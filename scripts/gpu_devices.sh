#!/usr/bin/env bash
# train.devices on a CUDA machine with PyTorch and no Rust. Build the `nccl`
# binaries where Rust is and put them where this script looks:
#
#   cargo build --release --no-default-features --features nccl --bin pretrain
#   mkdir -p .gpu && cp target/release/pretrain .gpu/
#
# then, on the GPU machine, from the repository root:
#
#   scripts/gpu_devices.sh OUT_DIR
#
# It trains the smoke config on README.md's text on GPU 0 alone (train.devices
# = 1), then with train.devices = 2: on a machine with two GPUs or more the two
# models must agree to 1e-4 of the weights' scale (the NCCL sum changes only
# the order floats are summed in); on a machine with one GPU the second run
# must be refused in one line.
set -uo pipefail
out=${1:?usage: scripts/gpu_devices.sh OUT_DIR}
mkdir -p "$out"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
bin=${PRETRAIN:-.gpu/pretrain}
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$out/gpus.txt"
run() {
  "$bin" --corpus README.md --config configs/smoke/pretrain.toml \
    --set train.steps=6 --set train.batch_size=8 "$@"
}
run --out "$out/one" 2>"$out/one.err" || { echo "FAIL: one GPU"; tail -3 "$out/one.err"; exit 1; }
if [ "$gpus" -lt 2 ]; then
  if run --set train.devices=2 --out "$out/two" 2>"$out/two.err"; then
    echo "FAIL: train.devices=2 ran on $gpus GPU"; exit 1
  fi
  echo "ok: one GPU trains; train.devices=2 on $gpus GPU is refused:"
  grep -m1 error "$out/two.err"
  exit 0
fi
run --set train.devices=2 --out "$out/two" 2>"$out/two.err" || { echo "FAIL: two GPUs"; tail -3 "$out/two.err"; exit 1; }
python3 - "$out/one/model.safetensors" "$out/two/model.safetensors" <<'PY'
import json, struct, sys
import numpy as np

def tensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    return {k: np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]], dtype=np.float32)
            for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"}

a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert a.keys() == b.keys(), "different tensors"
scale = max(float(np.abs(t).max()) for t in a.values())
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
print(f"max |one - two| = {diff:.3g}, weights' scale {scale:.3g}")
sys.exit(0 if diff <= 1e-4 * scale else 1)
PY
status=$?
[ $status -eq 0 ] && echo "ok: train.devices=2 agrees with one GPU" || echo "FAIL: the models differ"
exit $status
