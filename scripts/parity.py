#!/usr/bin/env python3
"""Logit parity between Baton and Hugging Face transformers.

Needs `pip install torch transformers safetensors` (not a dependency of the
build or the Rust test suite).

  # Compare an exported checkpoint with `baton logits` on the same prompt:
  baton export --from runs/x/sft --to /tmp/hf
  baton logits --from runs/x/sft --prompt "What is 2 + 2?" --out /tmp/logits.json
  python3 scripts/parity.py compare --export /tmp/hf --logits /tmp/logits.json

  # Compare a GGUF import with transformers reading the same GGUF (needs
  # `pip install gguf accelerate` too):
  baton import gguf --file SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol
  baton logits --from /tmp/smol --prompt "The capital of France is" --out /tmp/logits.json
  python3 scripts/parity.py compare --gguf SmolLM2-135M-Instruct.Q4_1.gguf --logits /tmp/logits.json

  # Check a GGUF export the same way (f32 should stay within 1e-4):
  baton export --from runs/x/sft --format gguf --to /tmp/x.gguf
  python3 scripts/parity.py compare --gguf /tmp/x.gguf --logits /tmp/logits.json

  # A LoRA checkpoint: the base export plus PEFT's adapter (pip install peft):
  baton export --from runs/x/sft-lora --to /tmp/hf --adapter-only
  baton logits --from runs/x/sft-lora --prompt "What is 2 + 2?" --out /tmp/logits.json
  python3 scripts/parity.py compare --export /tmp/hf --adapter /tmp/hf/adapter --logits /tmp/logits.json

  # Regenerate tests/golden/lora-logits.json (the golden model with an adapter):
  BATON_WRITE_GOLDEN_LORA=/tmp/golden-lora cargo test --release -p baton lora_logits
  python3 scripts/parity.py golden --model-dir /tmp/golden-lora --out tests/golden/lora-logits.json

  # Regenerate tests/golden/tiny-logits.json (what CI checks in Rust):
  BATON_WRITE_GOLDEN=/tmp/golden cargo test --release -p baton golden
  python3 scripts/parity.py golden --model-dir /tmp/golden --out tests/golden/tiny-logits.json

  # Regenerate tests/golden/moe-logits.json (the golden model with every layer
  # sparse, loaded by transformers as MixtralForCausalLM):
  BATON_WRITE_GOLDEN_MOE=/tmp/golden-moe cargo test --release -p baton moe_logits
  python3 scripts/parity.py golden --model-dir /tmp/golden-moe --out tests/golden/moe-logits.json

  # Regenerate tests/golden/smollm2-logits.json (checked when CI has the GGUF):
  python3 scripts/parity.py golden-gguf --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out tests/golden/smollm2-logits.json

`compare` prints one JSON line and exits 1 when the max absolute logit
difference exceeds --tol (1e-4 by default, for f32).
"""

import argparse
import json
import sys


def load(model_dir, gguf_file=None, adapter=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32)
    if adapter:
        # PEFT applies the LoRA adapter itself (needs `pip install peft`).
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model


def split_gguf(path):
    """(directory, file name) of a GGUF path, as transformers wants them."""
    import os

    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


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
    if args.gguf:
        # transformers dequantizes the GGUF itself (gguf-py): an independent reader.
        source, gguf_file = split_gguf(args.gguf)
    else:
        source, gguf_file = args.export, None
    model = load(source, gguf_file, args.adapter)
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
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        encoded = tok(theirs["prompt"], add_special_tokens=False)["input_ids"]
        # Baton puts its document-start id first; an export names the same token bos.
        same_start = gguf_file is not None or ids[0] == tok.bos_token_id
        report["tokenizer_agrees"] = same_start and encoded == ids[1:]
    print(json.dumps(report))
    ok = diff <= args.tol and report.get("tokenizer_agrees", True)
    sys.exit(0 if ok else 1)


def golden(args):
    import torch
    import transformers

    import os

    ids = json.load(open(f"{args.model_dir}/ids.json"))
    adapter = f"{args.model_dir}/adapter"
    model = load(args.model_dir, adapter=adapter if os.path.isdir(adapter) else None)
    logits = logits_for(model, ids)
    json.dump(
        {
            "about": "logits of the seeded tiny model (src/interop/hf.rs), with its LoRA adapter when the directory has one, computed by transformers (+ peft); regenerate with scripts/parity.py golden",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "ids": ids,
            "logits": [[float(f"{v:.7g}") for v in row] for row in logits.tolist()],
        },
        open(args.out, "w"),
    )
    print(f"wrote {args.out}: {len(ids)} positions x {logits.shape[-1]} logits")


def golden_gguf(args):
    """Golden logits of a GGUF model as transformers computes them: for each
    position, the top-16 token ids and 16 ids spread over the vocabulary."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    source, gguf_file = split_gguf(args.gguf)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = load(source, gguf_file)
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = [start] + tok(args.prompt, add_special_tokens=False)["input_ids"]
    logits = logits_for(model, ids)
    vocab = logits.shape[-1]
    spread = [i * (vocab // 16) + 7 for i in range(16)]
    rows = []
    for pos in range(len(ids)):
        top = torch.topk(logits[pos], 16).indices.tolist()
        chosen = sorted(set(top + spread))
        rows.append({"ids": chosen, "logits": [float(f"{logits[pos, i].item():.7g}") for i in chosen]})
    json.dump(
        {
            "about": f"transformers' logits for {gguf_file} (dequantized by gguf-py); regenerate with scripts/parity.py golden-gguf",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "prompt": args.prompt,
            "ids": ids,
            "positions": rows,
        },
        open(args.out, "w"),
        indent=1,
    )
    print(f"wrote {args.out}: {len(ids)} positions")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--export", help="directory from `baton export`")
    source.add_argument("--gguf", help="the GGUF file a checkpoint was imported from (`baton import gguf`)")
    c.add_argument("--logits", required=True, help="JSON from `baton logits`")
    c.add_argument("--adapter", help="a PEFT adapter directory (`baton export --adapter-only` writes DIR/adapter)")
    c.add_argument("--tol", type=float, default=1e-4)
    g = sub.add_parser("golden")
    g.add_argument("--model-dir", required=True)
    g.add_argument("--out", required=True)
    gg = sub.add_parser("golden-gguf")
    gg.add_argument("--gguf", required=True)
    gg.add_argument("--prompt", default="The capital of France is Paris. 2 + 2 = 4.")
    gg.add_argument("--out", required=True)
    args = p.parse_args()
    {"compare": compare, "golden": golden, "golden-gguf": golden_gguf}[args.cmd](args)


if __name__ == "__main__":
    main()
