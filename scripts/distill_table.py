#!/usr/bin/env python3
"""Distillation (issue 21): a half-width student distilled from a default-size
teacher against the same student trained from scratch for the same steps,
in pretraining (val bpb) and in SFT (held-out task accuracy), and a sweep of
the teacher's top-k.

usage: scripts/distill_table.py BIN_DIR OUT_DIR CORPUS [--alpha A] [--topk 1,8,64,0]
                                [--sft-steps N] [--sft-topk K]

BIN_DIR holds the release binaries (pretrain, sft). The teacher is the default
pretrain config on CORPUS; every student uses the teacher's tokenizer
(tokenizer.path for the scratch student), d_model 64 and d_ff 192 (half the
default width) and the default steps. Prints markdown tables. Runs that
already finished in OUT_DIR are reused.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HALF = ["--set", "model.d_model=64", "--set", "model.d_ff=192"]


def run(*args):
    print("+", " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    start = time.time()
    subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)
    return time.time() - start


def metrics(ckpt):
    return json.loads((ckpt / "manifest.json").read_text())["metrics"]


def stage(out, *args):
    if not (out / "manifest.json").exists():
        run(*args, "--out", out)
    return metrics(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("corpus", type=Path)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", default="1,8,64,0", help="comma-separated; 0 = the whole vocabulary")
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-topk", type=int, default=64)
    p.add_argument("--teacher-sft-steps", type=int, default=0,
                   help="SFT steps of the teacher (default: --sft-steps)")
    p.add_argument("--tail", choices=["true", "false"], default="true",
                   help="distill.tail: the teacher's mass outside its top-k as one more outcome")
    a = p.parse_args()
    b, out = a.bin, a.out
    out.mkdir(parents=True, exist_ok=True)
    distill = ["--set", f"distill.alpha={a.alpha}", "--set", f"distill.temperature={a.temperature}",
               "--set", f"distill.tail={a.tail}"]
    suffix = "" if a.tail == "true" else "-renorm"
    if (a.alpha, a.temperature) != (0.5, 1.0):
        suffix += f"-a{a.alpha}-t{a.temperature}"
    tail_label = "tail" if a.tail == "true" else "renormalised"

    teacher = out / "teacher"
    t = stage(teacher, b / "pretrain", "--corpus", a.corpus)
    tok = ["--set", f"tokenizer.path=\"{teacher / 'tokenizer.json'}\""]
    scratch = out / "student-scratch"
    s = stage(scratch, b / "pretrain", "--corpus", a.corpus, *HALF, *tok)
    rows = [("teacher (d_model 128)", t), ("student from scratch (d_model 64)", s)]
    for k in [int(x) for x in a.topk.split(",") if x]:
        name = "full" if k == 0 else str(k)
        d = stage(out / f"student-top{name}{suffix if k else ''}", b / "pretrain", "--corpus", a.corpus, *HALF,
                  "--teacher", teacher, *distill, "--set", f"distill.top_k={k}")
        rows.append((f"student distilled, top-k {name}" + (f" ({tail_label})" if k else ""), d))
    if not a.topk:
        rows = rows[:2]
    print(f"\nPretraining: α = {a.alpha}, τ = {a.temperature}, {int(t['tokens_seen'])} tokens each\n")
    print("| model | params | val bpb | Δ vs scratch | wall s |")
    print("|---|---|---|---|---|")
    for label, m in rows:
        delta = m["val_bpb"] - s["val_bpb"]
        print(f"| {label} | {int(m['params'])} | {m['val_bpb']:.4f} | {delta:+.4f} | {m['wall_seconds']:.1f} |")

    # SFT: the teacher's SFT teaches the scratch student's SFT.
    sft_cfg = ["--config", REPO / "configs/demo/sft-short.toml", "--set", f"train.steps={a.sft_steps}"]
    teacher_steps = a.teacher_sft_steps or a.sft_steps
    teacher_sft = out / f"teacher-sft-{teacher_steps}"
    t_sft = stage(teacher_sft, b / "sft", "--from", teacher, "--config",
                  REPO / "configs/demo/sft-short.toml", "--set", f"train.steps={teacher_steps}")
    s_sft = stage(out / "student-sft-scratch", b / "sft", "--from", scratch, *sft_cfg)
    d_sft = stage(out / f"student-sft-distilled-top{a.sft_topk}{suffix}-teacher{teacher_steps}", b / "sft",
                  "--from", scratch, *sft_cfg, "--teacher", teacher_sft, *distill,
                  "--set", f"distill.top_k={a.sft_topk}")
    print(f"\nSFT: {a.sft_steps} steps of configs/demo/sft-short.toml, held-out generated tasks\n")
    print("| model | task accuracy | val loss | wall s |")
    print("|---|---|---|---|")
    for label, m in [(f"teacher SFT (d_model 128, {teacher_steps} steps)", t_sft),
                     ("student SFT, plain", s_sft),
                     (f"student SFT, distilled (top-k {a.sft_topk}, {tail_label}, α {a.alpha}, τ {a.temperature})", d_sft)]:
        print(f"| {label} | {m['task_accuracy']:.3f} | {m['val_loss']:.4f} | {m['wall_seconds']:.1f} |")


if __name__ == "__main__":
    main()
