#!/usr/bin/env python3
"""Negating a task vector (issue 21): a small pretrained model continued on an
all-capitals copy of its corpus learns to write in capitals; task arithmetic
with a negative scale subtracts that from the base. Reports the share of
upper-case letters in sampled text and val bpb on the original text's last
10 % for the base, the capitals model and each negation.

usage: scripts/negation.py BIN_DIR OUT_DIR CORPUS.txt [--base DIR] [--steps N]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args):
    print("+", " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("corpus", type=Path)
    p.add_argument("--base", type=Path, help="a pretrained checkpoint of the small config")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--scales", default="-0.1,-0.2,-0.3,-0.5,-1.0")
    a = p.parse_args()
    b, out = a.bin, a.out
    out.mkdir(parents=True, exist_ok=True)
    text = a.corpus.read_text()
    upper = out / "upper.txt"
    upper.write_text(text.upper())
    val = out / "val.txt"
    val.write_text(text[int(len(text) * 0.9):])
    base = a.base or out / "base"
    if not (base / "manifest.json").exists():
        run(b / "pretrain", "--config", REPO / "configs/demo/small.toml",
            "--set", "train.steps=600", "--corpus", a.corpus, "--out", base)
    caps = out / "caps"
    if not (caps / "manifest.json").exists():
        run(b / "pretrain", "--from", base, "--config", REPO / "configs/demo/small.toml",
            "--set", f"train.steps={a.steps}", "--set", "train.lr=1e-3",
            "--set", "train.warmup_steps=5", "--corpus", upper, "--out", caps)
    rows = [("base", base), ("capitals (continued)", caps)]
    for scale in [float(x) for x in a.scales.split(",")]:
        dest = out / f"negated{scale}"
        if not (dest / "manifest.json").exists():
            run(b / "baton", "merge", "--method", "task-arithmetic", "--base", base,
                "--models", caps, "--scales", scale, "--out", dest)
        rows.append((f"base − {-scale}·τ_caps", dest))

    def upper_share(ckpt):
        letters = upper_letters = 0
        for seed in range(8):
            sample = run(b / "baton", "generate", "--from", ckpt, "--prompt", "\n",
                         "--max-new-tokens", 200, "--seed", seed)
            letters += sum(c.isalpha() for c in sample)
            upper_letters += sum(c.isupper() for c in sample)
        return upper_letters / max(letters, 1)

    results = {}
    for label, ckpt in rows:
        bpb = json.loads(run(b / "baton", "eval", "--from", ckpt, "--text", val))["bpb"]
        results[label] = (upper_share(ckpt), bpb)
    print("| model | upper-case share of sampled letters | val bpb |")
    print("|---|---|---|")
    for label, (share, bpb) in results.items():
        print(f"| {label} | {share:.3f} | {bpb:.4f} |")
    (out / "negation.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
