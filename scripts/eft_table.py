#!/usr/bin/env python3
"""Emulated fine-tuning (issue 21): task accuracy and stop rate of EFT
sampling over β against the small fine-tuned model and the large base.

usage: scripts/eft_table.py BIN_DIR OUT_DIR --large-base L --small-ft F --small-base S
                            [--betas 0,0.5,1,1.5] [--count 300]

The three checkpoints must share a tokenizer (scripts/distill_table.py makes
such a set: teacher = large base, student-scratch = small base,
student-sft-scratch = small fine-tuned). Held-out generated tasks, greedy.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(*args):
    print("+", " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    start = time.time()
    out = subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout
    return out, time.time() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--large-base", type=Path, required=True)
    p.add_argument("--small-ft", type=Path, required=True)
    p.add_argument("--small-base", type=Path, required=True)
    p.add_argument("--betas", default="0,0.5,1,1.5")
    p.add_argument("--count", type=int, default=300)
    a = p.parse_args()
    b = a.bin
    a.out.mkdir(parents=True, exist_ok=True)
    tasks = a.out / "heldout.jsonl"
    if not tasks.exists():
        run(b / "baton", "data", "tasks", "--split", "heldout", "--count", a.count, "--out", tasks)

    def evaluate(*flags):
        out, secs = run(b / "baton", "eval", "--tasks", tasks, *flags)
        return json.loads(out), secs

    rows = [("small fine-tuned alone", *evaluate("--from", a.small_ft)),
            ("large base alone", *evaluate("--from", a.large_base))]
    for beta in a.betas.split(","):
        rows.append((f"EFT β = {beta}", *evaluate(
            "--eft-large-base", a.large_base, "--eft-small-ft", a.small_ft,
            "--eft-small-base", a.small_base, "--eft-beta", beta)))
    families = sorted(k.split("/")[1] for k in rows[0][1] if k.startswith("task_accuracy/"))
    print(f"\n{a.count} held-out generated tasks, greedy, max 24 new tokens\n")
    print("| sampler | task accuracy | stop rate | " + " | ".join(families) + " | eval s |")
    print("|---|---|---|" + "---|" * len(families) + "---|")
    for label, m, secs in rows:
        per = " | ".join(f"{m.get('task_accuracy/' + f, 0):.2f}" for f in families)
        print(f"| {label} | {m['task_accuracy']:.3f} | {m['stop_rate']:.3f} | {per} | {secs:.1f} |")


if __name__ == "__main__":
    main()
