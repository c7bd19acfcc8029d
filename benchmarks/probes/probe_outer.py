# Unmaintained probe: correctness of outer (column) reductions on odd shapes, and a sweep of the
# outer-kernel launch constants for the bias-gradient case. Run on an H200, 2026-12-02; results in
# benchmarks/results/probe_outer_h200_2026-12-02{,_tile}.log and RESULTS.md ("Reductions, column
# reductions, blocks and models on an H200"). The maintained bias-gradient figure is
# bench_reductions.py's bias_grad case.
"""Outer (column) reductions on the GPU: correctness on odd shapes, then a sweep
of the launch rule's two constants for the bias-gradient case.

    python3 benchmarks/probes/probe_outer.py            # CUDA only

Correctness: (h, h.sum(0), h.amax(0), h.var(0), softmax(h, 0)) with
h = g * sigmoid(x), fp32 and bf16, shapes whose rows do not fill the last
block, against eager with assert_close; a kernel that is not an outer-layout
one is reported. Sweep: `gelu_backward(g, x)` and its column sum (a Linear's
bias gradient) for every (OUTER_RBLOCK, OUTER_PROGRAMS) pair, medians of
`triton.testing.do_bench`, and bandwidth as a share of a device copy.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402
import triton  # noqa: E402

import kitsune  # noqa: E402
from kitsune.codegen.triton import emit  # noqa: E402


def columns(g, x):
    h = g * torch.sigmoid(x)
    return h, h.sum(0), h.amax(0), h.var(0), torch.softmax(h, 0)


def bias_grad(g, x):
    d = torch.ops.aten.gelu_backward(g, x)
    return d, d.sum(0)


def check(device: str = "cuda") -> bool:
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(1000, 77), (4096, 1024), (3, 5000, 40), (16384, 96)]:
            torch._dynamo.reset()
            kitsune.reset_fusion_stats()
            g = torch.randn(*shape, device=device, dtype=dtype)
            x = torch.randn(*shape, device=device, dtype=dtype)
            g.view(-1)[7] = float("nan")
            got = torch.compile(columns, backend="kitsune", dynamic=False)(g, x)
            want = columns(g, x)
            exact = columns(g.double(), x.double())
            status = "ok"
            for k, (a, b, e) in enumerate(zip(got, want, exact)):
                # no worse than eager against float64 (long float32 sums are
                # off eager by eager's own error, so assert_close cannot judge them)
                finite = torch.isfinite(e)
                ours = (a.double() - e)[finite].abs().max().item()
                eagers = (b.double() - e)[finite].abs().max().item()
                same_nan = torch.equal(a.isnan(), b.isnan())
                if not same_nan or ours > 2 * eagers + 1e-6:
                    ok, status = False, f"WRONG output {k}: error {ours:.2e} vs eager {eagers:.2e}, NaN same {same_nan}"
            stats = kitsune.get_fusion_stats()
            print(f"check {str(dtype):15s} {str(shape):16s} groups={stats['num_fused']} "
                  f"fallbacks={len(stats['fallbacks'])} {status}")
    return ok


def sweep(copy: float) -> None:
    for shape in [(16384, 4096), (4096, 1024), (4096, 4096)]:
        g = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        nbytes = 3 * g.numel() * 2 + shape[1] * 2
        want = bias_grad(g, x)
        eager = triton.testing.do_bench(lambda: bias_grad(g, x), return_mode="median")
        torch._dynamo.reset()
        ind = torch.compile(bias_grad, dynamic=False)
        ind(g, x)
        inductor = triton.testing.do_bench(lambda: ind(g, x), return_mode="median")
        print(f"bias_grad {shape}: eager {eager:.4f} ms, inductor {inductor:.4f} ms "
              f"({100 * nbytes / inductor / 1e6 / copy:.0f}% of copy)")
        for tile in (2048, 8192, 32768):
            for warps in (4, 8, 16):
                emit.OUTER_TILE, emit.OUTER_WARPS = tile, warps
                torch._dynamo.reset()
                fn = torch.compile(bias_grad, backend="kitsune", dynamic=False)
                got = fn(g, x)
                torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
                torch.testing.assert_close(got[1].float(), want[1].float(), rtol=3e-2, atol=0.5)
                ms = triton.testing.do_bench(lambda: fn(g, x), return_mode="median")
                print(f"  OUTER_TILE={tile:6d} warps={warps:3d}: {ms:.4f} ms "
                      f"({100 * nbytes / ms / 1e6 / copy:.0f}% of copy)")


if __name__ == "__main__":
    if not torch.cuda.is_available():  # a dry run of the checks through the C backend
        sys.exit(0 if check("cpu") else 1)
    copy = common.copy_rate(torch.device("cuda"), 1 << 28, 20)["gb_per_s"]
    print(f"copy rate {copy:.1f} GB/s")
    good = check() if "--no-check" not in sys.argv else True
    sweep(copy)
    emit.OUTER_TILE, emit.OUTER_WARPS = 8192, None
    print("correctness:", "all ok" if good else "FAILURES above")
