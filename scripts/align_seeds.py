#!/usr/bin/env python3
"""Runs align arms from one parent over several seeds and prints their table.

    python3 scripts/align_seeds.py --bin target/release --from SFT --out DIR \\
        --seeds 1,2,3 --arm 'dpo x3:align.rounds=3' --arm 'grpo:align.method="grpo"'

Each arm is `NAME:KEY=VALUE;KEY=VALUE…` (the `--set`s of that arm). Seed s
sets `train.seed`, `pairs.seed` and `grpo.seed` (s, s + 10, s + 20), so the
pairs, the GRPO samples and the data order all change with it. A run already
complete in DIR (its `manifest.json` present) is read, not rerun. The table
gives greedy held-out accuracy (and the harder set's, when the arms set
`[harder]`), the gain over the parent, KL to the reference, and wall and
sampling seconds: mean ± sd over the seeds, and every seed's value.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


def run_arm(args, name, sets, seed):
    out = os.path.join(args.out, f"{name.replace(' ', '_')}-s{seed}")
    manifest = os.path.join(out, "manifest.json")
    if not os.path.exists(manifest):
        cmd = [os.path.join(args.bin, "align"), "--from", args.parent, "--out", out]
        seeds = [f"train.seed={seed}", f"pairs.seed={seed + 10}", f"grpo.seed={seed + 20}"]
        for s in seeds + sets:
            cmd += ["--set", s]
        print("running:", " ".join(cmd), file=sys.stderr, flush=True)
        with open(out + ".log", "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"{out}: align failed, see {out}.log")
    with open(manifest) as f:
        return json.load(f)["metrics"]


def cell(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="directory holding the align binary")
    parser.add_argument("--from", dest="parent", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--arm", action="append", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for arm in args.arm:
        name, _, sets = arm.partition(":")
        sets = [s for s in sets.split(";") if s]
        rows.append((name, [run_arm(args, name, sets, s) for s in seeds]))
    parent = rows[0][1][0]
    harder = any("harder/task_accuracy" in m for _, ms in rows for m in ms)
    print(f"parent: held-out accuracy {parent['parent_task_accuracy']:.3f}"
          + (f", harder {parent.get('parent_harder/task_accuracy', float('nan')):.3f}" if harder else ""))
    head = "| arm | accuracy | gain | per seed | "
    head += "harder | harder gain | " if harder else ""
    head += "KL to reference | wall s | sampling s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, ms in rows:
        acc = [m["task_accuracy"] for m in ms]
        gain = [m["task_accuracy"] - m["parent_task_accuracy"] for m in ms]
        line = f"| {name} | {cell(acc)} | {cell(gain)} | {', '.join(f'{a:.3f}' for a in acc)} | "
        if harder:
            h = [m.get("harder/task_accuracy") for m in ms]
            hg = [m["harder/task_accuracy"] - m["parent_harder/task_accuracy"]
                  if "harder/task_accuracy" in m and "parent_harder/task_accuracy" in m else None
                  for m in ms]
            line += f"{cell(h)} | {cell(hg)} | "
        line += f"{cell([m.get('kl_to_reference') for m in ms])} | "
        line += f"{cell([m.get('wall_seconds') for m in ms], 0)} | "
        line += f"{cell([m.get('sample_seconds') for m in ms], 0)} |"
        print(line)


if __name__ == "__main__":
    main()
