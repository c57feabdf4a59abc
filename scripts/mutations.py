#!/usr/bin/env python3
"""Mutation checks for the test suite: each entry breaks one line of the code
on purpose, runs the test that should notice, and restores the file.

Usage: scripts/mutations.py [NAME ...]   (no names: all of them)

A mutation a test does not catch prints `exit 0; failed: []`. The patterns are
exact text of the code as of the commit that added this script; one that no
longer matches prints PATTERN NOT FOUND.
"""
import subprocess, sys
muts = [
 ("split cut moves back", "core/src/data.rs", "            cut += 1;\n        }\n        self.text.split_at(cut)", "            cut -= 1;\n        }\n        self.text.split_at(cut)", "split_is_last_tenth"),
 ("skipped step still steps", "core/src/train.rs", "        } else {\n            state.bad_in_a_row = 0;\n            model = optim.step", "        }\n        {\n            state.bad_in_a_row = 0;\n            model = optim.step", "a_skipped_step_leaves"),
 ("stop tokens ignored", "core/src/generate.rs", "        if sampling.stop.contains(&next) {\n            break;\n        }", "", "top_k_one_is_greedy"),
 ("swap not recovered", "core/src/checkpoint.rs", "        let _ = fs::rename(&old, &current);\n", "", "sigkilled_run_resumes"),
 ("chatml template drops a newline", "core/src/hf.rs", "message['role'] + '\\\\n' + message['content']", "message['role'] + message['content']", "a_chatml_model_goes_through"),
 ("gpt124m typo", "configs/gpt124m.toml", "tie_embeddings = true", "tie_embedings = true", "shipped_configs_parse"),
]
muts += [
 ("metrics not truncated on resume", "core/src/train.rs", ".is_some_and(|s| s <= step)", ".is_some_and(|_| true)", "sigkilled_run_resumes"),
 ("learning rate zero", "core/src/optim.rs", "    if step < warmup {\n        return lr * (step + 1) as f64 / warmup as f64;", "    if step < u64::MAX {\n        return 0.0 * lr;", "pretrain_writes"),
 ("cache positions from 0", "core/src/model.rs", "        let start = cache.len();", "        let start = 0 * cache.len();", "cached_and_uncached"),
]
muts += [
 ("adam step count off by one on resume", "core/src/train.rs", ".load_state(moments, state.step - state.skipped_steps, device)", ".load_state(moments, state.step - state.skipped_steps + 1, device)", "killed_sft_and_align"),
 ("adamw decays norms too", "core/src/optim.rs", "if D >= 2 && cfg.weight_decay > 0.0 {", "if cfg.weight_decay > 0.0 {", "adamw_matches"),
 ("adamw without bias correction", "core/src/optim.rs", "bias1: 1.0 - self.config.beta1.powi(t),", "bias1: 1.0,", "adamw_matches"),
 ("no clipping", "core/src/optim.rs", "let grad_scale = if clip > 0.0 && grad_norm > clip {", "let grad_scale = if clip > 0.0 && grad_norm > 1e30 {", "adamw_matches"),
 ("bpb inverted ratio", "stage-pretrain/src/lib.rs", "loss_nats_per_token * (tokens as f64 / bytes as f64)", "loss_nats_per_token * (bytes as f64 / tokens as f64)", "bits_per_byte_and"),
]
muts += [
 ("norm gains ignored", "core/src/model.rs", "            return crate::fused::rms_norm(x, self.weight.val(), self.eps);", "            return crate::fused::rms_norm(x, self.weight.val().ones_like(), self.eps);", "logits_match_transformers"),
 ("kl estimate sign", "stage-align/src/lib.rs", "p.iter().zip(&r).map(|(a, b)| (a - b) as f64)", "p.iter().zip(&r).map(|(a, b)| (b - a) as f64)", "pairs_are_labelled"),
 ("verifier ignored", "stage-align/src/lib.rs", "            let ok = task.check(&text);", "            let ok = k == 1;", "pairs_are_labelled"),
]
only = sys.argv[1:] 
for name, path, old, new, test in muts:
    if only and name not in only: continue
    src = open(path).read()
    if old not in src:
        print(f"{name}: PATTERN NOT FOUND"); continue
    open(path, "w").write(src.replace(old, new, 1))
    try:
        p = subprocess.run(["cargo", "test", "--release", "--workspace"] + test.split()[:1], capture_output=True, text=True, timeout=1200)
        out = p.stdout + p.stderr
        failed = [l for l in out.splitlines() if l.startswith("test ") and "FAILED" in l]
        panics = [l for l in out.splitlines() if "panicked" in l or "error[" in l]
        print(f"{name}: exit {p.returncode}; failed: {failed}; {panics[:1]}")
    finally:
        open(path, "w").write(src)
