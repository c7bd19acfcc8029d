"""Channels-last vs contiguous on the CPU (one thread): eager and Kitsune per-call µs, interleaved
rounds, best of 7. `PYTHONPATH=$PWD/src python3 benchmarks/probes/probe_channels_last.py [case ...]`
(issue 14, layouts; an unmaintained probe)."""
import sys, time, torch, torch.nn as nn, torch.nn.functional as F
import kitsune
torch.set_num_threads(1)
torch.manual_seed(0)

class LN2d(nn.LayerNorm):  # timm LayerNorm2d
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)

class ConvNeXtBlock(nn.Module):
    def __init__(s, C):
        super().__init__(); s.dw = nn.Conv2d(C, C, 7, padding=3, groups=C); s.norm = LN2d(C, eps=1e-6)
        s.pw1 = nn.Linear(C, 4 * C); s.pw2 = nn.Linear(4 * C, C); s.g = nn.Parameter(torch.full((C,), 0.1))
    def forward(s, x):
        y = s.dw(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, s.norm.normalized_shape, s.norm.weight, s.norm.bias, 1e-6)
        y = s.pw2(F.gelu(s.pw1(y))) * s.g
        return x + y.permute(0, 3, 1, 2)

class MBConv(nn.Module):  # EfficientNet-ish depthwise block, eval BN folded or not
    def __init__(s, C):
        super().__init__(); s.dw = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False); s.bn1 = nn.BatchNorm2d(C)
        s.se1 = nn.Conv2d(C, C // 4, 1); s.se2 = nn.Conv2d(C // 4, C, 1)
        s.pw = nn.Conv2d(C, C, 1, bias=False); s.bn2 = nn.BatchNorm2d(C)
    def forward(s, x):
        y = F.silu(s.bn1(s.dw(x)))
        se = torch.sigmoid(s.se2(F.silu(s.se1(y.mean((2, 3), keepdim=True)))))
        return x + s.bn2(s.pw(y * se))

def pointwise(x): return F.silu(x * 1.5 + 0.25) * x
def reduce_c(x): return x.sum(1)
def reduce_hw(x): return x.mean((2, 3))
def softmax_c(x): return torch.softmax(x, 1)
def norm_c(x):  # channels-first LayerNorm (ConvNeXt's own, data_format=channels_first)
    u = x.mean(1, keepdim=True); s = (x - u).pow(2).mean(1, keepdim=True); return (x - u) / torch.sqrt(s + 1e-6)

CASES = {
    "pointwise": (pointwise, (8, 64, 28, 28)),
    "sum over C": (reduce_c, (8, 64, 28, 28)),
    "mean over HW": (reduce_hw, (8, 64, 28, 28)),
    "softmax over C": (softmax_c, (8, 64, 28, 28)),
    "norm over C (NCHW)": (norm_c, (8, 64, 28, 28)),
    "LayerNorm2d": (LN2d(96).eval(), (8, 96, 28, 28)),
    "ConvNeXt block": (ConvNeXtBlock(96).eval(), (8, 96, 28, 28)),
    "MBConv block": (MBConv(96).eval(), (8, 96, 28, 28)),
}

def timeit(f, x, n):
    t = time.perf_counter()
    for _ in range(n): f(x)
    return (time.perf_counter() - t) / n * 1e6

def main(names):
    for name in names or CASES:
        fn, shape = CASES[name]
        for layout in ("contiguous", "channels_last"):
            x = torch.randn(shape)
            if layout == "channels_last": x = x.to(memory_format=torch.channels_last)
            torch._dynamo.reset()
            c = torch.compile(fn, backend="kitsune")
            with torch.no_grad():
                torch.testing.assert_close(c(x), fn(x), atol=1e-4, rtol=1e-4)
                n = 20
                best = {"eager": 1e9, "kitsune": 1e9}
                for _ in range(7):
                    for k, f in (("eager", fn), ("kitsune", c)):
                        best[k] = min(best[k], timeit(f, x, n))
            print(f"{name:22s} {layout:14s} eager {best['eager']:8.1f} us  kitsune {best['kitsune']:8.1f} us  "
                  f"ratio {best['eager'] / best['kitsune']:.2f}", flush=True)

main(sys.argv[1:])
