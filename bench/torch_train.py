#!/usr/bin/env python3
"""PyTorch side of Baton's `versus` harness: the same Llama in plain PyTorch.

Same architecture as core/src/model.rs (RMSNorm, rotate-half RoPE, grouped-query
attention via scaled_dot_product_attention, SwiGLU, tied or untied head), the
same initial weights (read from the safetensors file Baton writes, HF names and
[out, in] layout), the same batch, mean cross-entropy, global-norm clipping and
AdamW with decay on matrices only, in f32 eager mode — what a PyTorch user
would write. Run by `cargo run -p baton-bench --release --bin versus`; by hand:

  python3 bench/torch_train.py --spec spec.json --steps 10 --warmup 2 --threads 2

Prints one JSON line: tokens_per_s, first_loss, step times, peak memory (the
process's maximum resident set on CPU, max allocated on CUDA), the best f32
matmul FLOP/s of this process and versions. Needs `pip install torch safetensors`.
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.h, self.kv = c["n_heads"], c["n_kv_heads"]
        self.hd = d // self.h
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, f = c["d_model"], c["d_ff"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = Mlp(c)
        self.input_layernorm = RMSNorm(c["d_model"], c["norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["d_model"], c["norm_eps"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["d_model"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["n_layers"]))
        self.norm = RMSNorm(c["d_model"], c["norm_eps"])


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = Decoder(c)
        self.tied = c["tie_embeddings"]
        if not self.tied:
            self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        hd = c["d_model"] // c["n_heads"]
        inv = c["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(c["max_seq_len"], dtype=torch.float64), inv)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return F.linear(x, head)


def matmul_peak(n, reps, device, dtype):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-size", type=int, default=1024)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    spec = json.load(open(args.spec))
    c, t = spec["model"], spec["train"]
    dev = args.device
    # f32 means f32: no TF32 in matmuls (PyTorch's default, stated here).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Llama(c).to(dev)
    model.load_state_dict(load_file(spec["weights"], device=dev), strict=True)
    # bf16: pure bfloat16 parameters, activations and AdamW state, as Baton's.
    model = model.to(dtype)
    b, s = t["batch_size"], t["seq_len"]
    inputs = torch.tensor(spec["inputs"], dtype=torch.long, device=dev).view(b, s)
    targets = torch.tensor(spec["targets"], dtype=torch.long, device=dev).view(b, s)
    matrices = [q for q in model.parameters() if q.dim() >= 2]
    gains = [q for q in model.parameters() if q.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": t["weight_decay"]}, {"params": gains, "weight_decay": 0.0}],
        lr=t["lr"],
        betas=(t["beta1"], t["beta2"]),
        eps=t["eps"],
    )

    def step():
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        optim.step()
        value = loss.item()  # waits for the device
        return value

    if dev != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    first_loss = step()
    first_step = time.perf_counter() - started
    for _ in range(max(args.warmup - 1, 0)):
        step()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    tokens = b * s
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if dev != "cpu":
        peak = torch.cuda.max_memory_allocated()
    print(
        json.dumps(
            {
                "tokens_per_s": tokens * len(times) / sum(times),
                "peak_memory_bytes": peak,
                "first_loss": first_loss,
                "first_step_seconds": first_step,
                "step_seconds": times,
                "matmul_peak_flops": matmul_peak(args.peak_size, 3, dev, dtype),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
