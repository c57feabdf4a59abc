#!/usr/bin/env python3
"""Merging two task experts (issue 21): from one small pretrained base, two SFT
models on disjoint task families, then linear, task-arithmetic and TIES merges
over a scale / density sweep, each evaluated on both families' held-out sets.

usage: scripts/merge_table.py BIN_DIR OUT_DIR [--pretrain-steps N] [--sft-steps N]

BIN_DIR holds the release binaries (baton, pretrain, sft). Prints a markdown
table: held-out accuracy on family set A, on set B, and each as a ratio of the
single expert's accuracy on its own set.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAMILIES = {
    "A": ["add", "sub", "mul", "reverse", "sort_letters"],
    "B": ["sort_numbers", "count_char", "kv_lookup", "word_at", "format_answer"],
}


def run(*args):
    print("+", " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--common-steps", type=int, default=0,
                   help="first an SFT on all ten families for this many steps; the experts and "
                        "the merges start from it (0: from the pretrained base)")
    a = p.parse_args()
    out, b = a.out, a.bin
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not (base / "manifest.json").exists():
        run(b / "pretrain", "--config", REPO / "configs/demo/small.toml",
            "--set", f"train.steps={a.pretrain_steps}", "--out", base)
    if a.common_steps:
        common = out / "sft-common"
        if not (common / "manifest.json").exists():
            run(b / "sft", "--from", base, "--config", REPO / "configs/demo/sft-short.toml",
                "--set", f"train.steps={a.common_steps}", "--out", common)
        base = common
    held = {}
    for name, fams in FAMILIES.items():
        expert = out / f"sft-{name}"
        fam_list = json.dumps(fams)
        if not (expert / "manifest.json").exists():
            run(b / "sft", "--from", base, "--config", REPO / "configs/demo/sft-short.toml",
                "--set", f"train.steps={a.sft_steps}", "--set", f"tasks.families={fam_list}",
                "--set", f"train.lr={a.sft_lr}",
                "--out", expert)
        held[name] = out / f"heldout-{name}.jsonl"
        if not held[name].exists():
            run(b / "baton", "data", "tasks", "--split", "heldout", "--count", 30 * len(fams),
                "--families", ",".join(fams), "--out", held[name])

    def acc(ckpt, which):
        m = json.loads(run(b / "baton", "eval", "--from", ckpt, "--tasks", held[which]))
        return m["task_accuracy"]

    rows = [("sft-A (expert)", out / "sft-A"), ("sft-B (expert)", out / "sft-B"),
            (f"base ({base.name})", base)]
    merges = [("linear 0.5/0.5", ["--method", "linear"])]
    for lam in [0.5, 0.7, 1.0]:
        merges.append((f"task-arith λ={lam}", ["--method", "task-arithmetic", "--base", base,
                                               "--scales", f"{lam},{lam}"]))
    for density in [0.2, 0.5, 1.0]:
        merges.append((f"ties d={density}", ["--method", "ties", "--base", base,
                                             "--density", density]))
    for label, flags in merges:
        dest = out / ("merge-" + label.replace(" ", "_").replace("/", "-").replace("=", ""))
        if not (dest / "manifest.json").exists():
            run(b / "baton", "merge", *flags, "--models", f"{out / 'sft-A'},{out / 'sft-B'}",
                "--out", dest)
        rows.append((label, dest))

    results = {label: (acc(ck, "A"), acc(ck, "B")) for label, ck in rows}
    own_a, own_b = results["sft-A (expert)"][0], results["sft-B (expert)"][1]
    print(f"| model | acc on A families | acc on B families | A ÷ expert A | B ÷ expert B |")
    print("|---|---|---|---|---|")
    for label, (ra, rb) in results.items():
        print(f"| {label} | {ra:.3f} | {rb:.3f} | {ra / own_a:.2f} | {rb / own_b:.2f} |")
    (out / "merge_table.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
