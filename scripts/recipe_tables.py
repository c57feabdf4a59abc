#!/usr/bin/env python3
"""Tables for the shipped recipes (recipes/*.toml), computed from a run's
manifests and metrics.jsonl files. Prints markdown.

  scripts/recipe_tables.py continual RUN        # recipes/continual-replay.toml
  scripts/recipe_tables.py anneal RUN [RUN…]    # recipes/anneal.toml, one run per seed
  scripts/recipe_tables.py curriculum RUN [RUN…]  # recipes/seq-curriculum.toml
  scripts/recipe_tables.py filter RUN [RUN…]    # recipes/filtered-sft.toml
  scripts/recipe_tables.py blur RUN [RUN…]      # recipes/blur.toml
  scripts/recipe_tables.py grow RUN [RUN…] [--step-seconds SMALL,BIG]  # recipes/grow.toml
  scripts/recipe_tables.py upcycle RUN          # recipes/upcycle.toml
"""
import json
import statistics
import sys
from pathlib import Path


def manifest(step_dir):
    return json.loads((step_dir / "manifest.json").read_text())


def evals(step_dir, key):
    """(step, value) of every evaluation line holding `key`, in order."""
    out = []
    for line in (step_dir / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        if key in v and "train/loss" not in v:
            out.append((v["step"], v[key]))
    return out


def continual(run):
    run = Path(run)
    base = manifest(run / "base")["metrics"]
    print(f"base: val_bpb on A (shakespeare) {base['val/bpb/shakespeare']:.4f}, "
          f"on B (python) {base['val/bpb/python']:.4f}\n")
    print("| continuation | bpb A at switch | peak bpb A (step) | rise on A | rise cut vs 0 % | "
          "rise recovered by the last eval | back within 1 % of switch | final bpb A | final bpb B | B vs 0 % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rise0 = b0 = None
    for name in ["replay-0", "replay-5", "replay-10", "replay-20"]:
        d = run / name
        m = manifest(d)
        last = m["step"]
        curve = [(s, v) for s, v in evals(d, "val/bpb/shakespeare") if s < last]
        a0 = curve[0][1]
        peak_step, peak = max(curve, key=lambda p: p[1])
        rise = peak - a0
        back = next((s for s, v in curve if s > peak_step and v <= a0 * 1.01), None)
        recovered = (peak - curve[-1][1]) / rise if rise > 0 else float("nan")
        fa = m["metrics"]["val/bpb/shakespeare"]
        fb = m["metrics"]["val/bpb/python"]
        if name == "replay-0":
            rise0, b0 = rise, fb
        cut = 1 - rise / rise0 if rise0 else float("nan")
        print(f"| {name} | {a0:.4f} | {peak:.4f} ({peak_step}) | {rise:+.4f} | {cut:.0%} | "
              f"{recovered:.0%} (step {curve[-1][0]}) | {back if back is not None else f'not by step {last}'} | {fa:.4f} | {fb:.4f} | "
              f"{(fb / b0 - 1):+.2%} |")


def mean_sd(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def anneal(runs):
    keys = ["val_bpb", "val/bpb/shakespeare", "val/bpb/python"]
    print(f"{len(runs)} seed(s); mean ± sd of the final (full) evaluation\n")
    print("| schedule | " + " | ".join(keys) + " | steps | tokens |")
    print("|---|" + "---|" * (len(keys) + 2))
    for name in ["cosine", "wsd", "wsd-mix"]:
        ms = [manifest(Path(r) / name) for r in runs]
        cells = [mean_sd([m["metrics"][k] for m in ms]) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + f" | {ms[0]['step']} | {ms[0]['tokens_seen']} |")
    print("\nper seed, val_bpb: " + "; ".join(
        f"{Path(r).name}: " + ", ".join(
            f"{n} {manifest(Path(r) / n)['metrics']['val_bpb']:.4f}" for n in ["cosine", "wsd", "wsd-mix"])
        for r in runs))


def curriculum(runs):
    print("| rows | val_bpb | wall s | tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for name in ["fixed", "rising"]:
        ms = [manifest(Path(r) / name) for r in runs]
        print(f"| {name} | {mean_sd([m['metrics']['val_bpb'] for m in ms])} | "
              f"{mean_sd([m['metrics']['wall_seconds'] for m in ms])} | {ms[0]['tokens_seen']} | "
              f"{mean_sd([m['metrics']['tokens_per_second'] for m in ms])} |")


def filtered(runs):
    print("| sft | task_accuracy | backward passes skipped | wall s | tokens trained |")
    print("|---|---|---|---|---|")
    for name in ["sft", "sft-filtered", "sft-filtered-25"]:
        ms = [manifest(Path(r) / name) for r in runs]
        skipped = [m["metrics"].get("filter_skipped_share", 0.0) for m in ms]
        print(f"| {name} | {mean_sd([m['metrics']['task_accuracy'] for m in ms])} | "
              f"{statistics.mean(skipped):.1%} | {mean_sd([m['metrics']['wall_seconds'] for m in ms])} | "
              f"{ms[0]['tokens_seen']} |")


def blur(runs):
    """Two-stage (SFT then DPO/IPO) against one-stage (ORPO/ASFT from the base)."""
    print("| arm | stages | optimizer steps | held-out accuracy | harder held-out | KL to its reference | wall s |")
    print("|---|---|---|---|---|---|---|")
    arms = [("sft", ["sft"]), ("sft → dpo", ["sft", "sft-dpo"]), ("sft → ipo", ["sft", "sft-ipo"]),
            ("orpo (one stage)", ["orpo"]), ("asft (one stage)", ["asft"])]
    for label, steps in arms:
        ms = [[manifest(Path(r) / s) for s in steps] for r in runs]
        last = [m[-1]["metrics"] for m in ms]
        kl = [x["kl_to_reference"] for x in last if "kl_to_reference" in x]
        harder = [x["harder/task_accuracy"] for x in last if "harder/task_accuracy" in x]
        print(f"| {label} | {len(steps)} | {sum(m['step'] for m in ms[0])} | "
              f"{mean_sd([x['task_accuracy'] for x in last])} | {mean_sd(harder) if harder else '—'} | "
              f"{mean_sd(kl) if kl else '—'} | "
              f"{mean_sd([sum(m['metrics']['wall_seconds'] for m in arm) for arm in ms])} |")


def flops_per_token(model, seq_len):
    """6·N per token for the weights a token passes through (the embedding
    lookup excluded, a tied head counted once) plus 12·L·d·T for attention."""
    d, v, L, ff = model["d_model"], model["vocab_size"], model["n_layers"], model["d_ff"]
    kv = model["n_kv_heads"] * d // model["n_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d
    matmul = L * per_layer + d + v * d  # layers, final norm, head
    return 6 * matmul + 12 * L * d * seq_len


def crossing(curve, target):
    """The (fractional) step where a (step, value) curve first reaches
    `target` or below, interpolated between evaluations; None if never."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            if v0 <= target:
                return float(s0)
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def elapsed(step_dir):
    """(step, elapsed_seconds) of every logged training step."""
    out = [(0, 0.0)]
    for line in (step_dir / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        if "train/loss" in v:
            out.append((v["step"], v["elapsed_seconds"]))
    return out


def at(curve, step):
    """A (step, value) curve's value at `step`, linearly interpolated."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / max(s1 - s0, 1e-9)
    return curve[-1][1]


def grow(runs, step_seconds=None):
    """Compute to reach the scratch model's final val bpb: from scratch, and
    2 layers → grown to 4 with masks (MSG) and without (naive)."""
    print("| arm | run | steps to target | FLOPs to target | vs scratch | wall s to target | vs scratch | final val bpb |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        run = Path(run)
        scratch = manifest(run / "scratch")
        target = scratch["metrics"]["val_bpb"]
        train = scratch["train"]
        tokens = train["batch_size"] * train["seq_len"] * train.get("grad_accum", 1)
        big = flops_per_token(scratch["model"], train["seq_len"])
        small_m = manifest(run / "small")
        small = flops_per_token(small_m["model"], train["seq_len"])
        n_small = small_m["step"]
        wall = lambda d: manifest(d)["metrics"]["wall_seconds"]
        rows = [("scratch", None, run / "scratch")] + [(a, run / "small", run / a) for a in ("msg", "naive")]
        base = None
        for label, first, d in rows:
            curve = evals(d, "val/bpb")
            step = crossing(curve, target)
            final = manifest(d)["metrics"]["val_bpb"]
            if step is None:
                print(f"| {label} | {run.name} | not reached ({len(curve)} evals) | — | — | — | — | {final:.4f} |")
                continue
            if first is None:
                flops = step * tokens * big
                secs = at(elapsed(d), step) if step_seconds is None else step * step_seconds[1]
                total = step
            else:
                flops = (n_small * small + step * big) * tokens
                secs = (wall(first) + at(elapsed(d), step) if step_seconds is None
                        else n_small * step_seconds[0] + step * step_seconds[1])
                total = n_small + step
            if base is None:
                base = (flops, secs)
            print(f"| {label} | {run.name} | {total:.0f} | {flops:.3g} | {flops / base[0] - 1:+.1%} | "
                  f"{secs:.0f} | {secs / base[1] - 1:+.1%} | {final:.4f} |")


def upcycle(run):
    """Upcycled MoE against its dense parent at equal steps and equal time,
    then global against micro-batch balancing on two sources."""
    run = Path(run)
    parent = manifest(run / "dense")
    print("| arm | steps | parameters (active) | final val bpb | vs parent |")
    print("|---|---|---|---|---|")
    p = parent["metrics"]["val_bpb"]
    print(f"| dense parent | {parent['step']} | {parent['metrics']['params']:.0f} | {p:.4f} | — |")
    for name in ["moe", "dense-steps", "dense-time"]:
        m = manifest(run / name)
        moe = m["model"].get("moe")
        params = m["metrics"]["params"]
        active = ""
        if moe:
            d, ff, e, k = m["model"]["d_model"], m["model"]["d_ff"], moe["experts"], moe["top_k"]
            layers = sum(1 for i in range(m["model"]["n_layers"]) if (i + 1) % moe.get("every", 1) == 0)
            active = f" ({params - layers * (e - k) * 3 * d * ff:.0f})"
        v = m["metrics"]["val_bpb"]
        print(f"| {name} | {m['step']} | {params:.0f}{active} | {v:.4f} | {v - p:+.4f} |")
    print()
    print("| balance | val bpb | bpb shakespeare | bpb python | specialisation | layer-0 shares, shakespeare / python |")
    print("|---|---|---|---|---|---|")
    for name in ["mix-global", "mix-micro"]:
        m = manifest(run / name)["metrics"]
        shares = lambda src: "[" + ", ".join(f"{m[f'moe/share/{src}/0/{j}']:.2f}" for j in range(4)) + "]"
        print(f"| {name[4:]} | {m['val_bpb']:.4f} | {m['val/bpb/shakespeare']:.4f} | {m['val/bpb/python']:.4f} | "
              f"{m['moe/specialisation']:.4f} | {shares('shakespeare')} / {shares('python')} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    what, runs = sys.argv[1], sys.argv[2:]
    step_seconds = None
    if "--step-seconds" in runs:
        i = runs.index("--step-seconds")
        step_seconds = [float(x) for x in runs[i + 1].split(",")]
        runs = runs[:i] + runs[i + 2:]
    {"continual": lambda: continual(runs[0]), "anneal": lambda: anneal(runs),
     "curriculum": lambda: curriculum(runs), "filter": lambda: filtered(runs), "blur": lambda: blur(runs),
     "grow": lambda: grow(runs, step_seconds), "upcycle": lambda: upcycle(runs[0])}[what]()
