#!/usr/bin/env bash
# train.devices on a CUDA machine with PyTorch and no Rust. Build the `nccl`
# binaries where Rust is and put them where this script looks:
#
#   cargo build --release --no-default-features --features nccl --bin pretrain
#   cargo build --release -p baton-bench --no-default-features --features nccl --example nccl_sum
#   mkdir -p .gpu && cp target/release/pretrain target/release/examples/nccl_sum .gpu/
#
# then, on the GPU machine, from the repository root:
#
#   scripts/gpu_devices.sh OUT_DIR
#
# It trains the smoke config on README.md's text on GPU 0 alone (train.devices
# = 1), then with train.devices = 2. On a machine with two GPUs or more, the
# first step's loss and gradient norm must agree to 1e-4 (the NCCL sum changes
# only the order floats are summed in), and the weights' largest difference is
# printed (Adam can turn float noise in near-zero gradients into steps of lr's
# size, so it is not a pass/fail). On a machine with one GPU the second run
# must be refused in one line. First, nccl_sum checks the NCCL sum itself on
# every GPU (on one GPU, a communicator of one).
set -uo pipefail
out=${1:?usage: scripts/gpu_devices.sh OUT_DIR}
mkdir -p "$out"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
bin=${PRETRAIN:-.gpu/pretrain}
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$out/gpus.txt"
"${NCCL_SUM:-.gpu/nccl_sum}" "$gpus" || { echo "FAIL: nccl_sum"; exit 1; }
run() {
  "$bin" --corpus README.md --config configs/smoke/pretrain.toml \
    --set train.steps=6 --set train.batch_size=8 --set train.log_every=1 "$@"
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
python3 - "$out/one" "$out/two" <<'PY'
import json, struct, sys
import numpy as np

def tensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    return {k: np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]], dtype=np.float32)
            for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"}

def first_step(run):
    for line in open(f"{run}/metrics.jsonl"):
        v = json.loads(line)
        if v.get("step") == 1 and "train/loss" in v:
            return v["train/loss"], v["grad_norm"]

(l1, n1), (l2, n2) = first_step(sys.argv[1]), first_step(sys.argv[2])
print(f"step 1: loss {l1:.6f} / {l2:.6f}, grad norm {n1:.6f} / {n2:.6f}")
a = tensors(f"{sys.argv[1]}/model.safetensors")
b = tensors(f"{sys.argv[2]}/model.safetensors")
assert a.keys() == b.keys(), "different tensors"
scale = max(float(np.abs(t).max()) for t in a.values())
diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
print(f"after 6 steps: max |one - two| = {diff:.3g}, weights' scale {scale:.3g}")
sys.exit(0 if abs(l1 - l2) <= 1e-4 * abs(l1) and abs(n1 - n2) <= 1e-4 * n1 else 1)
PY
status=$?
[ $status -eq 0 ] && echo "ok: train.devices=2 agrees with one GPU" || echo "FAIL: the first steps differ"
exit $status
