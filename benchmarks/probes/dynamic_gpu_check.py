"""One-off check on a GPU: Kitsune's symbolic-size Triton kernels against eager.

    python3 benchmarks/probes/dynamic_gpu_check.py

Compiles small models with `dynamic=True` and `mark_dynamic`, calls them at
several sizes (fp32 and bf16, forward and backward) and compares with eager;
prints the graphs compiled and the groups fused per graph. Exits non-zero on a
mismatch.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

import kitsune
from kitsune.report.stats import GLOBAL_STATS


class Block(torch.nn.Module):
    def __init__(self, dim=256):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        h = x + F.gelu(self.fc(self.norm(x)))
        return torch.softmax(h * 0.5, dim=-1) + h


def _error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error against the float64 reference (norm of the difference / norm of the reference)."""
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def scores(q, k, bias):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.125 + bias, dim=-1)


def main() -> int:
    device = "cuda"
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
        kitsune.reset_fusion_stats()
        torch._dynamo.reset()
        model = Block().to(device, dtype)
        compiled = torch.compile(model, backend="kitsune", dynamic=True)
        exact = copy.deepcopy(model).double()
        for b, s in ((4, 100), (3, 257), (8, 1000), (1, 7)):
            x = torch.randn(b, s, 256, device=device, dtype=dtype)
            xc, xe, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
            out, want, ref = compiled(xc), model(xe), exact(x64)
            g = torch.randn_like(want)
            got = [out, *torch.autograd.grad(out, [xc, *model.parameters()], g)]
            exp = [want, *torch.autograd.grad(want, [xe, *model.parameters()], g)]
            refs = [ref, *torch.autograd.grad(ref, [x64, *exact.parameters()], g.double())]
            # Kitsune's error against float64 may not exceed eager's by more than 2x
            # (sums of 8000 terms in another order differ from eager's in float32)
            for k, (a, e, r) in enumerate(zip(got, exp, refs)):
                ours, theirs = _error(a, r), _error(e, r)
                if ours > 2 * theirs + 1e-6:
                    failures += 1
                    print(f"MISMATCH block {dtype} {b}x{s} tensor {k}: error vs float64 {ours:.3g}, eager's {theirs:.3g}")
        torch._dynamo.reset()
        fn = torch.compile(scores, backend="kitsune", dynamic=True)
        for s in (64, 333, 1024, 5):
            q, k = (torch.randn(2, 4, s, 64, device=device, dtype=dtype) for _ in range(2))
            bias = torch.zeros(s, s, device=device, dtype=dtype).masked_fill(
                torch.ones(s, s, device=device, dtype=torch.bool).triu(1), float("-inf"))
            with torch.no_grad():
                try:
                    torch.testing.assert_close(fn(q, k, bias), scores(q, k, bias), **tol)
                except AssertionError as error:
                    failures += 1
                    print(f"MISMATCH scores {dtype} {s}: {str(error)[:300]}")
        print(dtype, [(r.name, len(r.groups), r.fallbacks) for r in GLOBAL_STATS.graphs],
              "runtime fallbacks:", kitsune.get_fusion_stats()["runtime_fallbacks"])
    print("dynamic GPU check:", "FAILED" if failures else "ok", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
