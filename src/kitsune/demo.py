"""`python -m kitsune demo`: a transformer-style MLP block, compiled with Kitsune.

The block is embedding-free: x -> x @ W1 + b1 -> GELU -> @ W2 + b2 -> * scale
-> + x (residual). The matmuls stay in PyTorch; the bias + GELU and the
bias + scale + residual chains each become one generated kernel, forward and
backward. The demo prints what was fused, the kernels eager PyTorch launches
against Kitsune's, the largest difference to eager, and the time ratio to eager.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 1024):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, hidden) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.w2 = nn.Parameter(torch.randn(hidden, dim) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.randn(dim) * 0.1)
        self.scale = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        h = F.gelu(x @ self.w1 + self.b1)
        return x + (h @ self.w2 + self.b2) * self.scale


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(device: str | None = None, tokens: int = 4096, repeats: int = 20) -> dict:
    import kitsune
    from kitsune.backend import kitsune_backend

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    block = MLPBlock().to(device)
    x = torch.randn(tokens, 256, device=device)
    kitsune.reset_fusion_stats()
    compiled = torch.compile(block, backend=kitsune_backend)

    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        expected = block(x)
    max_diff = (out - expected).abs().max().item()
    torch.testing.assert_close(out, expected)

    # One training step: gradients must match eager's too.
    xg = x.clone().requires_grad_()
    compiled(xg).square().mean().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    xe = x.clone().requires_grad_()
    block(xe).square().mean().backward()
    grad_diff = max((g - p.grad).abs().max().item() for g, p in zip(grads, block.parameters()))
    for g, p in zip(grads, block.parameters()):
        torch.testing.assert_close(g, p.grad)

    with torch.no_grad():
        for _ in range(3):
            compiled(x), block(x)
        eager_ms = _median_ms(lambda: block(x), repeats, device)
        kitsune_ms = _median_ms(lambda: compiled(x), repeats, device)
    stats = kitsune.get_fusion_stats()
    return dict(device=str(device), compile_s=compile_s, max_diff=max_diff, grad_diff=grad_diff,
                eager_ms=eager_ms, kitsune_ms=kitsune_ms, stats=stats)


def main(device: str | None = None) -> int:
    print("Kitsune demo: x + (gelu(x @ W1 + b1) @ W2 + b2) * scale, 4096 tokens x 256 features")
    result = run_demo(device)
    stats = result["stats"]
    print(f"device: {result['device']}   first call (capture + compile): {result['compile_s']:.2f} s")
    # kernels_before: what eager PyTorch launches (one per aten op it dispatches, kitsune.ir.eager_count)
    print(f"fused groups: {stats['num_fused']}   kernels of all graphs compiled (inference, forward, backward): "
          f"eager PyTorch ≈ {stats['kernels_before']}, Kitsune {stats['kernels_after']}")
    for name, nodes, backend in stats["groups"]:
        print(f"  {name} [{backend}]: {' → '.join(nodes)}")
    for what, reason in stats["fallbacks"]:
        print(f"  not fused: {what}: {reason}")
    print(f"largest |difference| to eager: output {result['max_diff']:.3g}, gradients {result['grad_diff']:.3g}")
    print(f"forward time: eager {result['eager_ms']:.2f} ms, Kitsune {result['kitsune_ms']:.2f} ms "
          f"-> {result['eager_ms'] / result['kitsune_ms']:.2f}x eager speed")
    return 0
