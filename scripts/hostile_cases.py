#!/usr/bin/env python3
"""Tries Baton's binaries as a hostile user would, in a scratch directory.

Usage: scripts/hostile_cases.py BIN_DIR [--repo REPO]

BIN_DIR holds `baton`, `pretrain` and `sft` (e.g. target/release). Each case
sets up user files, runs one command (10 s limit), and reports:
  kept   - every user file the case planted is still there, unchanged
  exit   - the command's exit status (124 = it hung past the limit)
  lines  - lines of stderr that start with "error:"
and a verdict: `ok` (refused with one line and nothing lost, or accepted where
acceptance is right), `LOSS` (a user file gone or changed), `HANG`, `CRASH`
(a panic, abort or OOM), or `BAD` (anything else). Prints a table and the
count per verdict. Run against two builds to compare them.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

BIN = os.path.abspath(sys.argv[1])
REPO = os.path.abspath(
    sys.argv[sys.argv.index("--repo") + 1] if "--repo" in sys.argv else os.path.dirname(os.path.dirname(__file__))
)
SMOKE = os.path.join(REPO, "configs/smoke/pretrain.toml")
SMOKE_SFT = os.path.join(REPO, "configs/smoke/sft.toml")
ENV = dict(os.environ, RUST_LOG="off", NO_COLOR="1")
for k in list(ENV):
    if k.startswith("BATON__"):
        del ENV[k]


def run(args, cwd, env=None, timeout=10, bg=False):
    cmd = [os.path.join(BIN, args[0])] + args[1:]
    if bg:
        return subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")


def plant(path, text="the user's own\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def snapshot(paths):
    out = {}
    for p in paths:
        try:
            with open(p, "rb") as f:
                out[p] = f.read()
        except OSError:
            out[p] = None
    return out


def verdict(expect_ok, code, err, before, after, ranks=False):
    if any(after[p] != before[p] for p in before):
        return "LOSS"
    if code == 124:
        return "HANG"
    if code not in (0, 1) or "panicked" in err or "memory allocation" in err:
        return "CRASH"
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    if expect_ok:
        return "ok" if code == 0 else "BAD"
    if ranks:
        # Under baton launch each rank prints its own line; the launcher's
        # is the last.
        return "ok" if code != 0 and errors and err.strip().splitlines()[-1].startswith("error:") else "BAD"
    return "ok" if code != 0 and len(errors) == 1 else "BAD"


def corpus(d):
    text = open(os.path.join(REPO, "README.md")).read() * 3
    return plant(os.path.join(d, "corpus.txt"), text)


def gguf_head(n_tensors, n_kv):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def main():
    root = tempfile.mkdtemp(prefix="baton-hostile-")
    base = os.path.join(root, "base")
    os.makedirs(base)
    text = corpus(base)
    ck = os.path.join(base, "ckpt")
    code, err = run(["pretrain", "--corpus", text, "--config", SMOKE, "--set", "train.steps=3", "--out", ck], base, timeout=120)
    assert code == 0, err
    hf = os.path.join(base, "hf")
    code, err = run(["baton", "export", "--from", ck, "--to", hf], base, timeout=60)
    assert code == 0, err
    fifo = os.path.join(base, "fifo")
    os.mkfifo(fifo)
    rows = []

    def case(name, expect_ok, setup, ranks=False):
        d = os.path.join(root, f"case{len(rows):02d}")
        os.makedirs(d)
        planted, args, cwd, env = setup(d)
        before = snapshot(planted)
        code, err = run(args, cwd or d, env=env, timeout=60 if expect_ok else 10)
        after = snapshot(planted)
        v = verdict(expect_ok, code, err, before, after, ranks)
        first = next((l for l in err.splitlines() if l.startswith("error:")), err.strip().splitlines()[-1] if err.strip() else "")
        rows.append((name, code, v, first[:150]))

    pre = ["pretrain", "--corpus", text, "--config", SMOKE, "--set", "train.steps=2"]

    # 1. --out . and --out ..
    case("import hf --out . (cwd holds user files)", False,
         lambda d: ([plant(os.path.join(d, "w/notes.txt"))], ["baton", "import", "hf", "--dir", hf, "--out", "."], os.path.join(d, "w"), None))
    case("import hf --out .. (parent holds user files)", False,
         lambda d: ([plant(os.path.join(d, "notes.txt")), plant(os.path.join(d, "w/x.txt"))], ["baton", "import", "hf", "--dir", hf, "--out", ".."], os.path.join(d, "w"), None))
    case("pretrain --out .", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], pre + ["--out", "."], d, None))
    # 2. a non-checkpoint directory at --out
    case("pretrain --out R/pretrain holding notes.txt", False,
         lambda d: ([plant(os.path.join(d, "R/pretrain/notes.txt"))], pre + ["--out", "R/pretrain"], d, None))
    case("pretrain --out R/pretrain holding notes.txt --force", False,
         lambda d: ([plant(os.path.join(d, "R/pretrain/notes.txt"))], pre + ["--out", "R/pretrain", "--force"], d, None))
    case("baton run --out R where R/pretrain/notes.txt", False,
         lambda d: ([plant(os.path.join(d, "R/pretrain/notes.txt"))], ["baton", "run", "--out", "R", "--corpus", text, "--config", SMOKE, "--set", "train.steps=2", "--sft-config", SMOKE_SFT], d, None))
    case("import hf --out a user's directory", False,
         lambda d: ([plant(os.path.join(d, "mine/notes.txt"))], ["baton", "import", "hf", "--dir", hf, "--out", "mine"], d, None))
    case("import hf --out the source directory --force", False,
         lambda d: ([os.path.join(hf, "config.json")], ["baton", "import", "hf", "--dir", hf, "--out", hf, "--force"], d, None))
    # 3. --force and siblings
    def force_sibling(d, out, sibling):
        shutil.copytree(ck, os.path.join(d, out))
        return ([plant(os.path.join(d, sibling, "notes.txt"))], pre + ["--out", out, "--force"], d, None)
    case("pretrain --out M --force beside a user's M.old", True, lambda d: force_sibling(d, "M", "M.old"))
    case("pretrain --out model.v1 --force beside model.old", True, lambda d: force_sibling(d, "model.v1", "model.old"))
    # 4. export and <to>.partial
    case("export --to X where X.partial holds user files", False,
         lambda d: ([plant(os.path.join(d, "X.partial/notes.txt"))], ["baton", "export", "--from", ck, "--to", "X"], d, None))
    case("export --to X --force where X is a user's directory", False,
         lambda d: ([plant(os.path.join(d, "X/notes.txt"))], ["baton", "export", "--from", ck, "--to", "X", "--force"], d, None))
    # 5. single-file outputs
    case("data tasks --out existing.jsonl", False,
         lambda d: ([plant(os.path.join(d, "existing.jsonl"))], ["baton", "data", "tasks", "--count", "5", "--out", "existing.jsonl"], d, None))
    def inside(d, args):
        c = os.path.join(d, "ckpt")
        shutil.copytree(ck, c)
        files = [os.path.join(c, f) for f in os.listdir(c) if os.path.isfile(os.path.join(c, f))]
        return (files, [a.replace("CKPT", c) for a in args], d, None)
    case("data tasks --out CKPT/model.safetensors", False,
         lambda d: inside(d, ["baton", "data", "tasks", "--count", "5", "--out", "CKPT/model.safetensors"]))
    case("logits --out CKPT/manifest.json", False,
         lambda d: inside(d, ["baton", "logits", "--from", "CKPT", "--prompt", "hi", "--out", "CKPT/manifest.json"]))

    # 5b. merge outputs
    def tool_into(d, out_is_input, args):
        """A copy of the smoke checkpoint as CKPT, and `baton ARGS… --out`
        into it or into a user's directory."""
        c = os.path.join(d, "ckpt")
        shutil.copytree(ck, c)
        files = [os.path.join(c, f) for f in os.listdir(c) if os.path.isfile(os.path.join(c, f))]
        planted = files + ([] if out_is_input else [plant(os.path.join(d, "mine/notes.txt"))])
        out = c if out_is_input else os.path.join(d, "mine")
        return (planted, ["baton"] + [a.replace("CKPT", c) for a in args] + ["--out", out], d, None)
    def merge_into(d, out_is_input, extra):
        return tool_into(d, out_is_input, ["merge", "--method", "linear", "--models", f"CKPT,{ck}"] + extra)
    case("merge --out one of its models --force", False, lambda d: merge_into(d, True, ["--force"]))
    case("merge --out a user's directory --force", False, lambda d: merge_into(d, False, ["--force"]))
    case("merge --weights with too few values", False, lambda d: merge_into(d, False, ["--weights", "1"]))

    # 5b'. growth
    def grow_into(d, out_is_input, extra):
        return tool_into(d, out_is_input, ["grow", "--from", "CKPT"] + extra)
    case("grow --out its own parent --force", False, lambda d: grow_into(d, True, ["--layers", "3", "--force"]))
    case("grow --out a user's directory --force", False, lambda d: grow_into(d, False, ["--layers", "3", "--force"]))
    case("grow --layers below the parent's", False, lambda d: grow_into(d, False, ["--layers", "1"]))
    case("grow --d-model not divisible by --heads", False,
         lambda d: grow_into(d, False, ["--d-model", "44", "--heads", "6"]))
    case("grow with no size given", False, lambda d: grow_into(d, False, []))
    def upcycle_into(d, out_is_input, extra):
        return tool_into(d, out_is_input, ["upcycle", "--from", "CKPT"] + extra)
    case("upcycle --out its own parent --force", False, lambda d: upcycle_into(d, True, ["--force"]))
    case("upcycle --out a user's directory --force", False, lambda d: upcycle_into(d, False, ["--force"]))
    case("upcycle --top-k above --experts", False, lambda d: upcycle_into(d, False, ["--experts", "2", "--top-k", "3"]))
    case("upcycle --experts 1", False, lambda d: upcycle_into(d, False, ["--experts", "1", "--top-k", "1"]))

    # 5c. distillation and EFT inputs
    case("pretrain --teacher CKPT --out CKPT --force", False,
         lambda d: inside(d, pre + ["--teacher", "CKPT", "--out", "CKPT", "--force"]))
    def user_cache(d):
        mine = plant(os.path.join(d, "mine.bin"))
        return ([mine], pre + ["--teacher", ck, "--set", 'distill.teacher="cached"',
                               "--set", f'distill.cache="{mine}"', "--out", "out"], d, None)
    case("pretrain --teacher with a user's file as distill.cache", False, user_cache)
    other = os.path.join(base, "other")
    os.makedirs(other)
    with open(text) as f:
        half = f.read()[: 12000]
    with open(os.path.join(other, "corpus.txt"), "w") as f:
        f.write(half)
    code, err = run(["pretrain", "--corpus", os.path.join(other, "corpus.txt"), "--config", SMOKE,
                     "--set", "train.steps=2", "--out", os.path.join(other, "ckpt")], other, timeout=120)
    assert code == 0, err
    oc = os.path.join(other, "ckpt")
    case("sft --teacher with another tokenizer", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], ["sft", "--from", ck, "--teacher", oc, "--out", "out"], d, None))
    case("eval --eft-* with a model of another tokenizer", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], ["baton", "eval", "--tasks", os.path.join(d, "notes.txt"),
                    "--eft-large-base", oc, "--eft-small-ft", ck, "--eft-small-base", ck], d, None))

    # 5d. exports to files, freezing and LoRA
    def user_file_export(d, extra):
        mine = plant(os.path.join(d, "model.gguf"))
        return ([mine], ["baton", "export", "--from", ck, "--format", "gguf", "--to", mine] + extra, d, None)
    case("export --format gguf --to a user's file", False, lambda d: user_file_export(d, []))
    case("export --format gguf --to a user's file --force", False, lambda d: user_file_export(d, ["--force"]))
    case("export --format gguf --dtype q4_k", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], ["baton", "export", "--from", ck, "--format", "gguf",
                    "--dtype", "q4_k", "--to", "m.gguf"], d, None))
    case("export --format gguf --to CKPT/model.gguf", False,
         lambda d: inside(d, ["baton", "export", "--from", "CKPT", "--format", "gguf", "--to", "CKPT/model.gguf"]))
    sft_pre = ["sft", "--from", ck, "--config", SMOKE_SFT, "--set", "train.steps=2"]
    case("sft train.freeze matching nothing", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], sft_pre + ["--set", 'train.freeze=["model.layer.*"]', "--out", "out"], d, None))
    case("sft train.freeze everything", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], sft_pre + ["--set", 'train.freeze=["*"]', "--out", "out"], d, None))
    case("sft lora.rank=0", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], sft_pre + ["--set", "lora.rank=0", "--out", "out"], d, None))
    case("sft lora.targets naming no layer", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], sft_pre + ["--set", "lora.rank=2", "--set", 'lora.targets=["qkv"]', "--out", "out"], d, None))
    case("sft --merge-adapter on a parent without one", False,
         lambda d: ([plant(os.path.join(d, "notes.txt"))], sft_pre + ["--merge-adapter", "--out", "out"], d, None))

    # 6. two writers
    d = os.path.join(root, "lock")
    os.makedirs(d)
    first = run(pre[:-1] + ["train.steps=1000000", "--set", "train.save_every=5", "--out", "out"], d, bg=True)
    state = os.path.join(d, "out.partial/train_state/state.json")
    for _ in range(600):
        if os.path.exists(state):
            break
        time.sleep(0.05)
    code, err = run(pre + ["--out", "out", "--force"], d)
    time.sleep(0.2)
    alive = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    ok = code != 0 and alive and "another Baton run" in err
    rows.append(("second pretrain --force on a live run's --out", code, "ok" if ok else "LOSS" if alive and code == 0 else "BAD",
                 next((l for l in err.splitlines() if l.startswith("error:")), "")[:150]))

    # 7. FIFOs and devices
    for special in (fifo, "/dev/zero"):
        tag = "FIFO" if special == fifo else "/dev/zero"
        case(f"pretrain --config {tag}", False, lambda d, s=special: ([], pre + ["--config", s, "--out", "o"], d, None))
        case(f"pretrain tokenizer.path={tag}", False, lambda d, s=special: ([], pre + ["--set", f"tokenizer.path=\"{s}\"", "--out", "o"], d, None))
        case(f"sft --data {tag}", False, lambda d, s=special: ([], ["sft", "--from", ck, "--data", s, "--out", "o"], d, None))
        case(f"data pairs --rules --tasks {tag}", False, lambda d, s=special: ([], ["baton", "data", "pairs", "--rules", "--tasks", s, "--out", "p.jsonl"], d, None))
        case(f"import gguf --file {tag}", False, lambda d, s=special: ([], ["baton", "import", "gguf", "--file", s, "--out", "o"], d, None))
        case(f"pretrain --corpus {tag}", False, lambda d, s=special: ([], ["pretrain", "--corpus", s, "--config", SMOKE, "--out", "o"], d, None))

    # 8. crafted files
    def gguf_case(d, data):
        p = os.path.join(d, "x.gguf")
        with open(p, "wb") as f:
            f.write(data)
        return ([], ["baton", "import", "gguf", "--file", p, "--out", "o"], d, None)
    case("GGUF key length near 2^64", False, lambda d: gguf_case(d, gguf_head(0, 1) + struct.pack("<Q", 2**64 - 4) + b"\0" * 64))
    nested = gguf_head(0, 1) + struct.pack("<Q", 4) + b"deep" + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * 300_000)
    case("GGUF 300 000 nested arrays", False, lambda d: gguf_case(d, nested))

    def kv_u32(k, v):
        return struct.pack("<Q", len(k)) + k.encode() + struct.pack("<II", 4, v)
    arch = struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 5) + b"llama"
    kvs = [("llama.vocab_size", 32000), ("llama.block_count", 1000), ("llama.context_length", 4096), ("llama.embedding_length", 65536),
           ("llama.feed_forward_length", 200000), ("llama.attention.head_count", 512), ("llama.attention.head_count_kv", 512)]
    huge = gguf_head(0, 1 + len(kvs)) + arch + b"".join(kv_u32(k, v) for k, v in kvs)
    case("4 KB GGUF claiming 10^13 parameters", False, lambda d: gguf_case(d, huge + b"\0" * 4000))

    def hf_huge(d):
        h = os.path.join(d, "hf")
        shutil.copytree(hf, h)
        c = json.load(open(os.path.join(h, "config.json")))
        c.update(hidden_size=8192, num_hidden_layers=8, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
        json.dump(c, open(os.path.join(h, "config.json"), "w"))
        return ([], ["baton", "import", "hf", "--dir", h, "--out", "o"], d, None)
    case("HF config.json claiming 7B beside tiny weights", False, hf_huge)

    def manifest_huge(d):
        c = os.path.join(d, "ckpt")
        shutil.copytree(ck, c)
        m = json.load(open(os.path.join(c, "manifest.json")))
        m["model"].update(d_model=8192, n_layers=40)
        json.dump(m, open(os.path.join(c, "manifest.json"), "w"))
        return ([], ["baton", "generate", "--from", c, "--max-new-tokens", "2"], d, None)
    case("manifest.json model claiming huge dims", False, manifest_huge)
    for s in ["model.d_model=100000000", "train.batch_size=100000000000"]:
        case(f"pretrain --set {s}", False, lambda d, s=s: ([], pre + ["--set", s, "--out", "o"], d, None))

    # 9. NaN and ranges
    for s in ["train.grad_clip=nan", "train.weight_decay=nan", "train.eps=-1", "train.devices=2", "train.devices=0"]:
        case(f"pretrain --set {s}", False, lambda d, s=s: ([], pre + ["--set", s, "--out", "o"], d, None))
    for flag in ["--temperature", "--top-p"]:
        case(f"generate {flag} nan", False, lambda d, f=flag: ([], ["baton", "generate", "--from", ck, f, "nan", "--max-new-tokens", "2"], d, None))

    # 9b. baton launch --max-restarts: input failures are not restarted
    launch = ["baton", "launch", "--nproc-per-node", "2", "--threads", "1", "--grace", "2", "--max-restarts", "2"]
    case("launch --max-restarts without the stage's --out", False,
         lambda d: ([], launch + ["--master-port", "30700", "--"] + pre, d, None))
    case("launch --max-restarts, a config typo on every rank (not restarted)", False,
         lambda d: ([], launch + ["--master-port", "30710", "--"] + pre + ["--set", "train.lr=abc", "--out", "o"], d, None), ranks=True)
    case("launch --max-restarts --out R/pretrain holding notes.txt", False,
         lambda d: ([plant(os.path.join(d, "R/pretrain/notes.txt"))], launch + ["--master-port", "30720", "--"] + pre + ["--out", "R/pretrain"], d, None), ranks=True)

    # 10. messages
    case("pretrain --corpus a directory (message names it)", False,
         lambda d: ([], ["pretrain", "--corpus", d, "--config", SMOKE, "--out", "o"], d, None))

    def bom(d):
        p = plant(os.path.join(d, "bom.jsonl"), "\ufeff" + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
        return ([], ["sft", "--from", ck, "--data", p, "--config", SMOKE_SFT, "--set", "train.steps=1", "--out", "o"], d, None)
    case("sft --data with a UTF-8 BOM (accepted)", True, bom)

    def env_err(d):
        env = dict(ENV, BATON__TRAIN__MAX_BAD_STEPS="many")
        good = plant(os.path.join(d, "good.toml"), "[train]\nlr = 0.001\n")
        return ([], pre + ["--config", good, "--out", "o"], d, env)
    case("environment variable of the wrong type", False, env_err)
    case("baton run with an align-set typo (before pretraining)", False,
         lambda d: ([], ["baton", "run", "--out", "R", "--corpus", text, "--config", SMOKE, "--align-set", "align.los=dpo"], d, None))
    case("whitespace-only corpus", False,
         lambda d: ([], ["pretrain", "--corpus", plant(os.path.join(d, "blank.txt"), " \n\t\n"), "--config", SMOKE, "--out", "o"], d, None))

    # 11. manifest integrity
    def relabel(d):
        c = os.path.join(d, "ckpt")
        shutil.copytree(ck, c)
        p = os.path.join(c, "manifest.json")
        text = open(p).read()
        open(p, "w").write(text.replace('"stage": "pretrain"', '"stage": "sft"'))
        return ([], ["baton", "data", "pairs", "--from", c, "--tasks", t_file, "--out", "p.jsonl", "--samples", "2"], d, None)
    t_file = os.path.join(base, "tasks.jsonl")
    assert run(["baton", "data", "tasks", "--count", "3", "--out", t_file], base)[0] == 0
    case("a pretrain checkpoint relabelled sft in its manifest", False, relabel)

    def garbage_config(d):
        c = os.path.join(d, "ckpt")
        shutil.copytree(ck, c)
        p = os.path.join(c, "manifest.json")
        m = json.load(open(p))
        del m["files"]["config.json"]
        json.dump(m, open(p, "w"), indent=2)
        open(os.path.join(c, "config.json"), "w").write("garbage")
        return ([], ["baton", "export", "--from", c, "--to", "x"], d, None)
    case("manifest entry removed, garbage config.json", False, garbage_config)

    def resume_changed(d):
        r = run(pre[:-1] + ["train.steps=400", "--set", "train.save_every=2", "--out", "o"], d, bg=True)
        state = os.path.join(d, "o.partial/train_state/state.json")
        for _ in range(300):
            if os.path.exists(state):
                break
            time.sleep(0.05)
        time.sleep(0.3)
        r.send_signal(signal.SIGKILL)
        r.wait()
        return ([], pre[:-1] + ["train.steps=400", "--set", "train.save_every=2", "--set", "train.lr=0.01", "--out", "o", "--resume"], d, None)
    case("--resume with a different --set", False, resume_changed)

    # baton run --resume over a complete run: kept stages must match.
    tiny_run = ["--set", "train.steps=20", "--sft-config", SMOKE_SFT, "--align-config",
                os.path.join(REPO, "configs/smoke/align.toml"), "--align-set", "pairs.prompts=8"]
    d = os.path.join(root, "runresume")
    os.makedirs(d)
    code, err = run(["baton", "run", "--out", "R", "--corpus", text, "--config", SMOKE] + tiny_run, d, timeout=300)
    assert code == 0, err
    other = plant(os.path.join(d, "other.txt"), open(text).read()[:-100])
    for name, args in [
        ("baton run --resume with another --set", ["--corpus", text, "--config", SMOKE] + tiny_run[:-1] + ["pairs.prompts=9"]),
        ("baton run --resume with another corpus", ["--corpus", other, "--config", SMOKE] + tiny_run),
    ]:
        code, err = run(["baton", "run", "--out", "R", "--resume"] + args, d, timeout=60)
        first = next((l for l in err.splitlines() if l.startswith("error:")), "")
        rows.append((name, code, "ok" if code != 0 and first else "BAD", first[:150]))

    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  exit  verdict  first error line")
    for name, code, v, first in rows:
        print(f"{name:<{width}}  {code:>4}  {v:<7}  {first}")
    counts = {}
    for r in rows:
        counts[r[2]] = counts.get(r[2], 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f"  ({len(rows)} cases)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
