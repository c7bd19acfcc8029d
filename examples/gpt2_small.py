"""GPT-2 small (12 layers, d=768, 12 heads, 50257-token vocabulary), built from torch only, randomly
initialised: the fusion report does not depend on the weights.

    python -m kitsune explain examples/gpt2_small.py:model --report gpt2-report.html
"""
import math, torch, torch.nn as nn, torch.nn.functional as F

class Attn(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.h = h; s.qkv = nn.Linear(d, 3 * d); s.proj = nn.Linear(d, d)
    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, s.h, C // s.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return s.proj(y)

class Block(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.ln1 = nn.LayerNorm(d); s.attn = Attn(d, h); s.ln2 = nn.LayerNorm(d)
        s.fc = nn.Linear(d, 4 * d); s.out = nn.Linear(4 * d, d)
    def forward(s, x):
        x = x + s.attn(s.ln1(x))
        return x + s.out(F.gelu(s.fc(s.ln2(x)), approximate="tanh"))

class GPT(nn.Module):
    def __init__(s, layers=12, d=768, h=12, vocab=50257, ctx=1024):
        super().__init__()
        s.wte = nn.Embedding(vocab, d); s.wpe = nn.Embedding(ctx, d)
        s.blocks = nn.ModuleList(Block(d, h) for _ in range(layers)); s.ln = nn.LayerNorm(d)
        s.head = nn.Linear(d, vocab, bias=False)
    def forward(s, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = s.wte(idx) + s.wpe(pos)
        for b in s.blocks:
            x = b(x)
        return s.head(s.ln(x))

torch.manual_seed(0)
model = GPT().eval()
example_inputs = (torch.randint(0, 50257, (1, 64)),)
