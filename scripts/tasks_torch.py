#!/usr/bin/env python3
"""The SFT task mixture in plain PyTorch, for checking how much training the
generated tasks need independently of Baton (README, "What SFT reaches here").

The same Llama as bench/torch_train.py, the same task texts and chat format as
core/src/tasks.rs and core/src/chat.rs (baton-chat v1), loss on the reply and
its end token, AdamW (0.9, 0.95), clip 1, cosine to 5 %. Each batch is
`--batch` conversations padded to the longest; greedy held-out accuracy per
family every `--eval_every` steps. Held-out instances are drawn first and the
training set never repeats one.

  python3 scripts/tasks_torch.py --ckpt runs/x/pretrain --families add --steps 1200 --scratch
  python3 scripts/tasks_torch.py --ckpt runs/x/pretrain \
      --families add,sub,mul,sortn,fmt,kv,count,word,rev,sortl --steps 3000 --ntrain 20000 --scratch

`--ckpt` gives the tokenizer and architecture (and the weights unless
`--scratch`, which keeps PyTorch's default initialisation). Needs torch,
safetensors and tokenizers.
"""
import sys, json, os, random, time, argparse
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'bench'))
import torch, torch.nn.functional as F
from torch_train import Llama
from tokenizers import Tokenizer

p = argparse.ArgumentParser()
p.add_argument('--ckpt', required=True)
p.add_argument('--families', default='add')
p.add_argument('--steps', type=int, default=900)
p.add_argument('--batch', type=int, default=64)
p.add_argument('--lr', type=float, default=3e-3)
p.add_argument('--scratch', action='store_true')
p.add_argument('--d', type=int, default=128)
p.add_argument('--layers', type=int, default=4)
p.add_argument('--eval_every', type=int, default=300)
p.add_argument('--digits', type=int, default=2)
p.add_argument('--wd', type=float, default=0.0)
p.add_argument('--warm', type=int, default=20)
p.add_argument('--init', default='torch')
p.add_argument('--estd', type=float, default=0.02)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--ntrain', type=int, default=4000)
args = p.parse_args()
random.seed(args.seed)
torch.set_num_threads(2)
ck = args.ckpt
tok = Tokenizer.from_file(ck + '/tokenizer.json')
c = json.load(open(ck + '/manifest.json'))['model']
if args.scratch:
    c = dict(c, d_model=args.d, n_layers=args.layers, d_ff=3 * args.d)
torch.manual_seed(args.seed)
model = Llama(c)
if args.scratch and args.init != 'torch':
    for n_, q in model.named_parameters():
        if q.dim() < 2: continue
        std = 0.02
        if 'o_proj' in n_ or 'down_proj' in n_: std = 0.02 / (2 * c['n_layers']) ** 0.5
        if 'embed' in n_: std = args.estd
        torch.nn.init.normal_(q, std=std)
if not args.scratch:
    from safetensors.torch import load_file
    model.load_state_dict(load_file(ck + '/model.safetensors'), strict=True)

D = args.digits
def gen(fam, rng):
    n = lambda: rng.randrange(10 ** D)
    if fam == 'add':
        a, b = n(), n(); return f'What is {a} + {b}?', str(a + b)
    if fam == 'sub':
        a, b = n(), n(); a, b = max(a, b), min(a, b); return f'What is {a} - {b}?', str(a - b)
    if fam == 'mul':
        a, b = n(), rng.randrange(10); return f'What is {a} * {b}?', str(a * b)
    if fam == 'sortn':
        v = [n() for _ in range(3)]; return 'Sort numbers: ' + ' '.join(map(str, v)), ' '.join(map(str, sorted(v)))
    if fam == 'fmt':
        a, b = n(), n(); return f'What is {a} + {b}? Reply exactly Answer: <n>', f'Answer: {a+b}'
    if fam == 'kv':
        keys = list(range(10)); rng.shuffle(keys); keys = keys[:3]
        pairs = [(k, rng.randrange(10)) for k in keys]; k, v = rng.choice(pairs)
        return '; '.join(f'k{a}={b}' for a, b in pairs) + f'. What is k{k}?', str(v)
    if fam == 'count':
        pool = [chr(97 + rng.randrange(26)) for _ in range(3)]
        w = [rng.choice(pool) for _ in range(5)]; t = rng.choice(pool)
        return f'Count {t} in: ' + ' '.join(w), str(w.count(t))
    if fam == 'word':
        W = "red sun cat king sea moon tree rose lord fire star wind gold bird ship love".split()
        w = [rng.choice(W) for _ in range(3)]; i = rng.randrange(1, 4)
        return f'Word {i} of: ' + ' '.join(w), w[i - 1]
    if fam == 'rev':
        w = [chr(97 + rng.randrange(26)) for _ in range(3)]; return 'Reverse: ' + ' '.join(w), ' '.join(reversed(w))
    if fam == 'sortl':
        w = [chr(97 + rng.randrange(26)) for _ in range(3)]; return 'Sort letters: ' + ' '.join(w), ' '.join(sorted(w))

fams = args.families.split(',')
hrng = random.Random(2)
held = []
hs = set()
while len(held) < 100 * len(fams):
    f = fams[len(held) % len(fams)]
    x = (f,) + gen(f, hrng)
    if x not in hs: held.append(x); hs.add(x)
rng = random.Random(1)
train = []
while len(train) < args.ntrain * len(fams):
    f = fams[len(train) % len(fams)]
    x = (f,) + gen(f, rng)
    if x not in hs: train.append(x)
def enc(s): return tok.encode(s, add_special_tokens=False).ids
def render(q, a):
    pr = [0, 4] + enc(q) + [6, 5]
    an = enc(a) + [6]
    return pr, an
rt = [render(q, a) for _, q, a in train]
L = max(len(p) + len(a) for p, a in rt)
print('max len', L, 'train', len(rt), 'held', len(held))

def batch(rows):
    x = torch.full((len(rows), L), 2, dtype=torch.long); y = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (pr, an) in enumerate(rows):
        s = pr + an
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(pr) - 1:len(s) - 1] = torch.tensor(an)
    return x, y

@torch.no_grad()
def evaluate():
    model.eval()
    res = {}
    for f, q, a in held:
        ids = [0, 4] + enc(q) + [6, 5]
        out = []
        for _ in range(12):
            lg = model(torch.tensor([ids + out]))[0, -1]
            t = int(lg.argmax())
            if t == 6: break
            out.append(t)
        ok = tok.decode(out).strip() == a
        res.setdefault(f, []).append(ok)
    model.train()
    return {f: sum(v) / len(v) for f, v in res.items()}

mats = [q for q in model.parameters() if q.dim() >= 2]; gains = [q for q in model.parameters() if q.dim() < 2]
opt = torch.optim.AdamW([{'params': mats, 'weight_decay': args.wd}, {'params': gains, 'weight_decay': 0}], lr=args.lr, betas=(0.9, 0.95))
import math
t0 = time.time()
order = []
for step in range(1, args.steps + 1):
    lr = args.lr * min(1, step / args.warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    for g in opt.param_groups: g['lr'] = lr
    if len(order) < args.batch:
        order += random.sample(range(len(rt)), len(rt))
    idx, order = order[:args.batch], order[args.batch:]
    x, y = batch([rt[i] for i in idx])
    loss = F.cross_entropy(model(x).view(-1, c['vocab_size']), y.view(-1))
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 50 == 0: print(step, round(loss.item(), 3), round(time.time() - t0, 1), flush=True)
    if step % args.eval_every == 0: print('eval', step, evaluate(), flush=True)
