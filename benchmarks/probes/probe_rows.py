# Unmaintained probe: hand-written variants of the layer_norm+GELU and cross-entropy row kernels
# (erf approximations, warps, chunk sizes, target load) to find what bounds them. Run on an H200,
# 2026-12-02; result in benchmarks/results/probe_rows_h200_2026-12-02.log and RESULTS.md ("Row
# kernels, gathers and host path on an H200", second session).
"""Row-kernel variants for the two GPU cases below the copy-rate target
(layer_norm+GELU and cross-entropy), written by hand in the shape Kitsune
generates, each checked against eager and timed, to find what bounds them.

    python3 benchmarks/probes/probe_rows.py            # CUDA only

layer_norm+GELU on 16384x4096 bf16: the generated structure with XBLOCK rows a
program and num_warps warps; the erf from libdevice, a cheaper erf (two
polynomial regions, one exp; error against float64 about 1.5x float32 erf's),
or no erf at all (not a correct kernel: it says what the erf costs).
cross-entropy on 8192x32000 bf16: the generated chunked online softmax (one
max and one sum across the block per chunk), a lane-wise online softmax (a
running max and sum per lane, reduced once at the end), and the target logit
picked by a masked sum (as generated) or read by one load per row.
Medians of `triton.testing.do_bench`; bandwidth as a share of a device copy.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kitsune.codegen.triton.libm import max_nan, one_plus_erf  # noqa: E402

# erf(x) for float32: x + x*P(x^2) for |x| <= 0.9275, else sign(x)*(1 - exp(Q(|x|))), 1 beyond 3.92


@triton.jit
def fast_erf(x):
    t = tl.abs(x)
    s = x * x
    p = -0.0005803627672578569
    p = p * s + 0.004949610011787777
    p = p * s + -0.026729671685222407
    p = p * s + 0.11280441450060198
    p = p * s + -0.3761228387864283
    p = p * s + 0.12837905914829342
    small = x + x * p
    q = -2.1423935560521036e-05
    q = q * t + 0.0004381681463307459
    q = q * t + -0.004188562730300401
    q = q * t + 0.025164353162434514
    q = q * t + -0.10834784170049216
    q = q * t + -0.6332868422211666
    q = q * t + -1.1295439360627906
    q = q * t + 0.00018057538899265372
    big = 1.0 - tl.exp(q)
    big = tl.where(t > 3.92, 1.0, big)
    big = tl.where(x < 0, -big, big)
    return tl.where(t <= 0.9275, small, big)


@triton.jit
def one_plus_erf_degree6(z):
    """The shipped `one_plus_erf` (kitsune.codegen.triton.libm, degree 7, 2^-17.8)
    with a degree-6 fit instead: relative error 2^-14.8, one FMA less."""
    t = tl.abs(z)
    q = 0.00020194596978393946
    q = q * t + -0.0036625202049728415
    q = q * t + 0.029658155379592804
    q = q * t + -0.1464882764184326
    q = q * t + -0.9210272607688879
    q = q * t + -1.6270873931969982
    q = q * t + -3.736526029373842e-05
    e = tl.where(t > 3.92, 0.0, tl.exp2(q))
    return tl.where(z < 0, e, 2.0 - e)


@triton.jit
def ln_gelu_kernel(X, W, B, Y, R: tl.constexpr, ROWS: tl.constexpr, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr,
                   ERF: tl.constexpr, GELU: tl.constexpr):
    row = (tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK))[:, None]
    rowmask = row < ROWS
    r = tl.arange(0, RBLOCK)[None, :]
    x = row * R + r
    m = rowmask & (r < R)
    v = tl.load(X + x, m).to(tl.float32)
    mean = tl.sum(tl.where(m, v, 0.0), 1)[:, None] / R
    d = v - mean
    var = tl.sum(tl.where(m, d * d, 0.0), 1)[:, None] / R
    h = d * tl.rsqrt(var + 1e-5)
    h = h * tl.load(W + r, r < R).to(tl.float32) + tl.load(B + r, r < R).to(tl.float32)
    h = h.to(tl.bfloat16).to(tl.float32)
    if GELU:
        z = h * 0.7071067811865476
        if ERF == 0:
            h = h * 0.5 * (tl.erf(z) + 1.0)
        elif ERF == 1:
            h = h * 0.5 * (fast_erf(z) + 1.0)
        elif ERF == 2:
            h = h * 0.5 * (z + 1.0)
        elif ERF == 3:
            h = h * 0.5 * one_plus_erf_degree6(z)
        else:
            h = h * 0.5 * one_plus_erf(z)
    tl.store(Y + x, h.to(tl.bfloat16), m)


@triton.jit
def ce_kernel(L, T, OUT, R: tl.constexpr, RBLOCK: tl.constexpr, LANE: tl.constexpr, DIRECT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * R
    target = tl.load(T + row)
    t32 = target.to(tl.int32)
    if LANE:
        mx = tl.full([RBLOCK], float("-inf"), tl.float32)
        sm = tl.zeros([RBLOCK], tl.float32)
    else:
        mrow = tl.full([], float("-inf"), tl.float32)
        srow = tl.zeros([], tl.float32)
    picked = tl.zeros([RBLOCK], tl.float32)
    for r0 in range(0, R, RBLOCK):
        r = r0 + tl.arange(0, RBLOCK)
        m = r < R
        v = tl.load(L + base + r, m, other=float("-inf")).to(tl.float32)
        if not DIRECT:
            picked += tl.where((r == t32) & m, v, 0.0)
        if LANE:
            new = tl.maximum(mx, v, propagate_nan=tl.PropagateNan.ALL)
            sm = sm * tl.where(new == float("-inf"), 0.0, tl.exp(mx - new)) + \
                tl.where(new == float("-inf"), 0.0, tl.exp(v - new))
            mx = new
        else:
            new = tl.maximum(mrow, tl.reduce(v, 0, max_nan), propagate_nan=tl.PropagateNan.ALL)
            srow = srow * tl.where(new == float("-inf"), 0.0, tl.exp(mrow - new)) + \
                tl.sum(tl.where(new == float("-inf"), 0.0, tl.exp(v - new)), 0)
            mrow = new
    if LANE:
        mrow = tl.reduce(mx, 0, max_nan)
        srow = tl.sum(tl.where(mrow == float("-inf"), 0.0, sm * tl.exp(mx - mrow)), 0)
    if DIRECT:
        tv = tl.load(L + base + t32).to(tl.float32)
    else:
        tv = tl.sum(picked, 0)
    loss = -((tv.to(tl.bfloat16).to(tl.float32) - mrow) - tl.log(srow))
    loss = tl.where(target != -100, loss, 0.0)
    tl.store(OUT + row, loss)


@triton.jit
def erf_only(Z, O, N: tl.constexpr):
    i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    tl.store(O + i, fast_erf(tl.load(Z + i, i < N)), i < N)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    dev = "cuda"
    copy = common.copy_rate(torch.device(dev), 1 << 28, 20)["gb_per_s"]
    print(f"copy {copy:.0f} GB/s")
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, R = 16384, 4096
    x = torch.randn(rows, R, generator=g).to(dev, torch.bfloat16)
    w = torch.randn(R, generator=g).to(dev, torch.bfloat16)
    b = torch.randn(R, generator=g).to(dev, torch.bfloat16)
    # erf accuracy against float64 (float32 erf as the yardstick)
    z = torch.linspace(-8, 8, 1 << 22, device=dev)
    ref = torch.erf(z.double())
    out = torch.empty_like(z)
    erf_only[(triton.cdiv(z.numel(), 1024),)](z, out, z.numel())
    print(f"erf max abs error vs float64: fast {(out.double() - ref).abs().max().item():.3e}, "
          f"torch float32 {(torch.erf(z).double() - ref).abs().max().item():.3e}, "
          f"nan kept {torch.isnan(torch.tensor([float('nan')], device=dev)).item()}")
    expected = F.gelu(F.layer_norm(x, (R,), w, b))
    # the function eager computes: layer_norm rounded to bf16, then GELU; its exact value
    exact = F.gelu(F.layer_norm(x, (R,), w, b).double())
    eager_err = (expected.double() - exact).abs()
    print(f"eager vs float64: max abs {eager_err.max().item():.3e}, mean {eager_err.mean().item():.3e}")
    nbytes = 2 * x.numel() * 2
    modes = ["libdevice", "two-region", "none", "erfc6", "erfc7"]
    for erf in (0, 1, 3, 4):
        y = torch.empty_like(x)
        ln_gelu_kernel[(rows,)](x, w, b, y, R, rows, 1, 4096, erf, 1, num_warps=4)
        err = (y.double() - exact).abs()
        print(f"erf={modes[erf]}: vs float64 max abs {err.max().item():.3e}, mean {err.mean().item():.3e}; "
              f"differs from eager at {100 * (y != expected).float().mean().item():.3f}% of elements")
    for gelu in (1, 0):
        for erf in ((0, 1, 2, 3, 4) if gelu else (0,)):
            for xblock, warps in ((1, 4), (1, 8), (2, 8), (2, 16), (1, 2), (2, 4)):
                y = torch.empty_like(x)
                fn = lambda: ln_gelu_kernel[(rows // xblock,)](x, w, b, y, R, rows, xblock, 4096, erf, gelu,
                                                                num_warps=warps)
                fn()
                ok = "-"
                if gelu and erf != 2:
                    ok = "ok" if torch.allclose(y.float(), expected.float(), rtol=1.6e-2, atol=1e-2) else "WRONG"
                ms = bench(fn)
                print(f"ln{'_gelu' if gelu else ''} erf={modes[erf]} XBLOCK={xblock} "
                      f"warps={warps}: {ms * 1e3:7.1f} us  {100 * nbytes / ms / 1e6 / copy:5.1f}% of copy  {ok}")
    rows, R = 8192, 32000
    logits = torch.randn(rows, R, generator=g).to(dev, torch.bfloat16)
    target = torch.randint(0, R, (rows,), generator=g).to(dev)
    target[5] = -100
    expected = F.cross_entropy(logits.float(), target, reduction="none")
    nbytes = logits.numel() * 2
    for lane in (0,):
        for direct in (0, 1):
            for rblock, warps in ((2048, 4), (2048, 2), (4096, 4), (8192, 8), (1024, 2), (1024, 1), (4096, 8)):
                out = torch.empty(rows, device=dev)
                fn = lambda: ce_kernel[(rows,)](logits, target, out, R, rblock, lane, direct, num_warps=warps)
                fn()
                ok = "ok" if torch.allclose(out, expected, rtol=2e-2, atol=2e-2) else "WRONG"
                ms = bench(fn)
                print(f"ce lane={lane} direct={direct} RBLOCK={rblock} warps={warps}: {ms * 1e3:7.1f} us  "
                      f"{100 * nbytes / ms / 1e6 / copy:5.1f}% of copy  {ok}")


if __name__ == "__main__":
    main()
