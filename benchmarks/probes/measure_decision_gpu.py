"""Unmaintained probe (2026-12-07, issue 12): a measured fuse-or-not decision on the GPU —
the user-op baseline of a LayerNorm against eager and the decomposed ops, a threshold that
turns the kernel off, and a training step measured before CUDA-graph recording.
Result: benchmarks/RESULTS.md, "The one-planner restructure (issue 12)"."""
import os, tempfile, time, torch, torch.nn as nn, torch.nn.functional as F
os.environ["KITSUNE_CACHE_DIR"] = tempfile.mkdtemp()
import kitsune
from kitsune.config import FusionConfig
from kitsune.report.stats import GLOBAL_STATS
from kitsune.tuning import measure as M
dev = "cuda"

class LN(nn.Module):
    def __init__(s):
        super().__init__(); s.ln = nn.LayerNorm(1024)
    def forward(s, x):
        h = s.ln(x)
        return h

def med(fn, n=50):
    ts = sorted(M._time(fn, [], torch.device(dev)) for _ in range(n)); return ts[n // 2]

def runner_state(fn):
    r = getattr(fn, "__self__", None)
    return r

for benefit in (1.01, 1e6):
    torch._dynamo.reset(); kitsune.reset_fusion_stats()
    m = LN().to(dev); x = torch.randn(4096, 1024, device=dev)
    opt = kitsune.optimize(m, FusionConfig(min_fusion_benefit=benefit))
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(opt(x), m(x))
        for rec in GLOBAL_STATS.records():
            print("benefit", benefit, "graph", rec.name, "cuda_graph", rec.cuda_graph, "groups", rec.groups, "fallbacks", rec.fallbacks)
            for k, v in rec.measured.items():
                print(" ", k, {a: b for a, b in v.items() if a not in ("rounds", "key")})
            for name, call in rec.kernel_calls.items():
                args = [x, m.ln.weight, m.ln.bias][:len(call.input_shapes)]
                print("  eager F.layer_norm", med(lambda: F.layer_norm(x, (1024,), m.ln.weight, m.ln.bias)))
                print("  decomposed fallback", med(lambda: call.fallback(*args)), "input shapes", call.input_shapes)
print(kitsune.get_fusion_stats()["measured"])

# training with CUDA graphs
torch._dynamo.reset(); kitsune.reset_fusion_stats()
m = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.LayerNorm(512)).to(dev)
opt = kitsune.optimize(m, FusionConfig(min_fusion_benefit=1e6))
x = torch.randn(256, 512, device=dev)
for _ in range(6):
    out = opt(x); out.sum().backward(); m.zero_grad(set_to_none=True)
for rec in GLOBAL_STATS.records():
    print("train", rec.name, "cuda_graph", rec.cuda_graph, "groups", rec.groups, [ (k, v["decision"], v["baseline"], round(v["speedup"], 2)) for k, v in rec.measured.items()])
