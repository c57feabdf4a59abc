#!/usr/bin/env python3
"""Logit parity between Baton and Hugging Face transformers.

Needs `pip install torch transformers safetensors` (not a dependency of the
build or the Rust test suite).

  # Compare an exported checkpoint with `baton logits` on the same prompt:
  baton export --from runs/x/sft --to /tmp/hf
  baton logits --from runs/x/sft --prompt "What is 2 + 2?" --out /tmp/logits.json
  python3 scripts/parity.py compare --export /tmp/hf --logits /tmp/logits.json

  # Regenerate tests/golden/tiny-logits.json (what CI checks in Rust):
  BATON_WRITE_GOLDEN=/tmp/golden cargo test --release -p baton-core golden
  python3 scripts/parity.py golden --model-dir /tmp/golden --out tests/golden/tiny-logits.json

`compare` prints one JSON line and exits 1 when the max absolute logit
difference exceeds --tol (1e-4 by default, for f32).
"""

import argparse
import json
import sys


def load(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def logits_for(model, ids):
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    return out.float()


def compare(args):
    import torch
    import transformers
    from transformers import AutoTokenizer

    theirs = json.load(open(args.logits))
    ids = theirs["ids"]
    model = load(args.export)
    ours = torch.tensor(theirs["logits"], dtype=torch.float32)
    hf = logits_for(model, ids)
    diff = (hf - ours).abs().max().item()
    report = {
        "max_abs_diff": diff,
        "positions": len(ids),
        "vocab": hf.shape[-1],
        "argmax_agree": bool((hf.argmax(-1) == ours.argmax(-1)).all().item()),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    if "prompt" in theirs:
        tok = AutoTokenizer.from_pretrained(args.export)
        encoded = tok(theirs["prompt"], add_special_tokens=False)["input_ids"]
        report["tokenizer_agrees"] = [tok.bos_token_id] + encoded == ids
    print(json.dumps(report))
    ok = diff <= args.tol and report.get("tokenizer_agrees", True)
    sys.exit(0 if ok else 1)


def golden(args):
    import torch
    import transformers

    ids = json.load(open(f"{args.model_dir}/ids.json"))
    model = load(args.model_dir)
    logits = logits_for(model, ids)
    json.dump(
        {
            "about": "logits of the seeded tiny model (core/src/hf.rs) computed by transformers; regenerate with scripts/parity.py golden",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "ids": ids,
            "logits": [[float(f"{v:.7g}") for v in row] for row in logits.tolist()],
        },
        open(args.out, "w"),
    )
    print(f"wrote {args.out}: {len(ids)} positions x {logits.shape[-1]} logits")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--export", required=True, help="directory from `baton export`")
    c.add_argument("--logits", required=True, help="JSON from `baton logits`")
    c.add_argument("--tol", type=float, default=1e-4)
    g = sub.add_parser("golden")
    g.add_argument("--model-dir", required=True)
    g.add_argument("--out", required=True)
    args = p.parse_args()
    compare(args) if args.cmd == "compare" else golden(args)


if __name__ == "__main__":
    main()
