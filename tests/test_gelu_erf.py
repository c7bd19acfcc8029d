"""GELU's 1 + erf(z) on the Triton backend: a cheaper form (`one_plus_erf`, and
for GELU's whole product `gelu_erf`) where the result only reaches
bfloat16/float16 outputs through products, and libdevice's erf everywhere else."""
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kitsune.codegen.triton.libm import gelu_erf, one_plus_erf
from kitsune.fusion.engine import FusionEngine


@triton.jit
def _apply_kernel(X, O, N: tl.constexpr, BLOCK: tl.constexpr, FN: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(O + i, FN(tl.load(X + i, i < N)), i < N)


def _apply(fn, x):
    """fn (a libm jit function) on every element of the float32 vector x."""
    out = torch.empty_like(x)
    _apply_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), 1024, fn)
    return out


def test_one_plus_erf_is_accurate_relative_to_its_value_and_keeps_specials():
    z = torch.cat([torch.linspace(-6, 6, 60001), torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan,
                                                               3.9199, 3.9201, -3.9199, -3.9201, 1e-30])])
    out = _apply(one_plus_erf, z)
    exact = torch.erfc(-z.double())
    finite = z.abs() <= 3.92
    relative = ((out.double() - exact) / exact)[finite].abs().max().item()
    assert relative < 2 ** -17, relative
    # beyond 3.92 float32 erf is +-1: exactly 0 or 2, as eager's 1 + erf(z)
    assert torch.equal(out[z > 3.92], torch.full_like(out[z > 3.92], 2.0))
    assert torch.equal(out[z < -3.92], torch.zeros_like(out[z < -3.92]))
    assert math.isnan(out[z.isnan()].item())
    # where 1 + erf(z) cancels (z near -3), eager's float32 loses digits; this form does not
    eager = (1 + torch.erf(z)).double()
    band = (z > -3.9) & (z < -2.5)
    assert ((out.double() - exact)[band].abs() <= (eager - exact)[band].abs() + 1e-12).float().mean() > 0.9


def test_gelu_erf_is_accurate_relative_to_its_value_and_keeps_specials():
    y = torch.cat([torch.linspace(-14, 14, 140001), torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan,
                                                                  5.5437, 5.5438, -5.5437, -5.5438, 1e-30, -1e-30])])
    out = _apply(gelu_erf, y)
    # y * Phi(y) in float64 without cancellation (float64's own 1 + erf is 0 below -8.3)
    yd = y.double()
    exact = torch.where(yd < 0, yd * 0.5 * torch.erfc(-yd * 0.5 ** 0.5), yd * (1 - 0.5 * torch.erfc(yd * 0.5 ** 0.5)))
    inside = (y.abs() <= 6) & (y != 0)
    relative = ((out.double() - exact) / exact)[inside].abs().max().item()
    assert relative < 2 ** -17, relative  # a bfloat16 half-step is 2^-9, a float16 one 2^-11
    # beyond the fit: y itself above; below, the tiny true value (eager's float32 gives
    # exactly 0 from -5.54 on), then 0
    assert torch.equal(out[y > 5.5], y[y > 5.5])
    tail = (y < -6) & (y >= -8)
    assert (((out.double() - exact) / exact)[tail].abs() < 2 ** -7).all()
    far = y.isfinite() & (y < -8)  # below 5e-15: between the true value and 0
    assert (out[far] <= 0).all() and (out[far].double().abs() <= exact[far].abs()).all()
    # signed zero, inf and NaN as eager's float64 formula 0.5 * y * (1 + erf(y / sqrt(2)))
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])
    got = out[-11:-6]
    want = (0.5 * specials.double() * (1 + torch.erf(specials.double() * 0.7071067811865476))).float()
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(torch.signbit(got[:2]), torch.signbit(want[:2]))


def _sources(fn, *args):
    engine = FusionEngine()
    result = engine.fuse(fn)(*args)
    calls = [c for rec in engine.records for c in rec.kernel_calls.values() if c.kernel is not None]
    assert calls, "nothing was fused"
    return result, "\n".join(c.kernel.source for c in calls)


def _ln_gelu(x, w, b):
    return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gelu_uses_the_cheap_form_and_is_as_accurate_as_eager(monkeypatch, dtype):
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    torch.manual_seed(0)
    x = (torch.randn(16, 256) * 3).to(dtype)
    w, b = torch.randn(256).to(dtype), torch.randn(256).to(dtype)
    got, source = _sources(_ln_gelu, x, w, b)
    assert "gelu_erf(" in source and "libm.erf(" not in source
    want = _ln_gelu(x, w, b)
    # the function eager computes: layer_norm rounded to `dtype`, then GELU, in float64
    exact = F.gelu(F.layer_norm(x, (256,), w, b).double())
    torch.testing.assert_close(got, want)
    err_got, err_want = (got.double() - exact).abs(), (want.double() - exact).abs()
    # the normalised input may round differently (another summation order), which
    # moves a few outputs by one step of `dtype`: the mean error is what must hold
    assert err_got.mean() <= err_want.mean() * 1.01 + 1e-6, (err_got.mean(), err_want.mean())


def test_pointwise_gelu_in_bf16_uses_the_cheap_form(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    x = torch.randn(4096).to(torch.bfloat16) * 4
    x[:6] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, -5.0])
    got, source = _sources(lambda t: F.gelu(t * 2) * 3, x)
    assert "gelu_erf(" in source and "libm.erf(" not in source
    # GELU(+inf): eager's vectorised float32/bfloat16 CPU kernels give NaN, float64 gives inf
    assert got[1] == math.inf and F.gelu(x[1:2].double() * 2).item() == math.inf
    keep = torch.arange(x.numel()) != 1
    torch.testing.assert_close(got[keep], (F.gelu(x * 2) * 3)[keep], equal_nan=True)


def test_float32_gelu_and_the_gelu_backward_keep_libdevice_erf(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    x = torch.randn(64, 32)
    got, source = _sources(lambda t: F.gelu(t) * 2, x)
    assert "libm.erf(" in source and "one_plus_erf(" not in source and "gelu_erf(" not in source
    torch.testing.assert_close(got, F.gelu(x) * 2)
    # GELU's derivative adds x * pdf to the cdf: a sum, where a relative error could cancel
    g, xb = torch.randn(64, 32).bfloat16(), torch.randn(64, 32).bfloat16()
    got, source = _sources(lambda a, b: torch.ops.aten.gelu_backward(a, b) * 1, g, xb)
    assert "one_plus_erf(" not in source and "gelu_erf(" not in source
    torch.testing.assert_close(got, torch.ops.aten.gelu_backward(g, xb))
