"""GELU's backward on the CPU backend: the cdf's erf(x / sqrt 2) and the pdf's
exp(-x^2 / 2) share one expf per element (`kitsune_erff_e`), in float only;
results stay within rounding of eager, NaN and Inf included."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kitsune
from kitsune.backend import make_backend
from kitsune.codegen.cpu import compile_kernels
from kitsune.codegen.cpu.emit import emit_kernel
from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
from kitsune.config import FusionConfig
from kitsune.ir.index import Index
from kitsune.ir.scalar import call, load

SQRT1_2 = 0.70710678118654752
INV_SQRT_2PI = 0.3989422804014327


@pytest.fixture(autouse=True)
def _cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    # a cache of its own: a library another test built is not built (nor written) again
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    kitsune.reset_fusion_stats()


def _new_sources():
    """A function that returns the C source of the libraries built since this call."""
    root = os.path.join(os.environ["KITSUNE_CACHE_DIR"], "cpu")
    before = set(glob.glob(os.path.join(root, "*.c")))
    return lambda: "".join(open(p).read() for p in sorted(set(glob.glob(os.path.join(root, "*.c"))) - before))


def _kernels(source: str) -> list[str]:
    """The generated kernel functions of a library source (not its prelude)."""
    end = "\n  return kitsune_err;\n}\n"
    parts = source.split("\nint kitsune_")[1:]
    # each kernel's uniform `<name>_entry(pointers, ints)` (the launcher's way in) only forwards
    return ["int kitsune_" + part[:part.index(end) + len(end)] for part in parts
            if "_entry(void *const *p" not in part.split("\n", 1)[0]]


def _gelu_fwd_bwd(x, grad, compiled: bool):
    """GELU's value and its gradient, through a compiled or eager forward."""
    x = x.detach().clone().requires_grad_()
    gelu = torch.compile(F.gelu, backend="kitsune", dynamic=False) if compiled else F.gelu
    y = gelu(x)
    y.backward(grad)
    return y, x.grad


def _specials(shape, dtype=torch.float32):
    x = torch.randn(shape) * 3
    flat = x.view(-1)
    values = [math.nan, math.inf, -math.inf, 10.0, -10.0, 20.0, -20.0, 1e-30, -1e-30, 1e-40, 0.0, -0.0,
              14.4, -14.4, 5.5, -5.5]  # 14.4: exp(-x^2 / 2) is subnormal
    flat[:len(values)] = torch.tensor(values)
    return x.to(dtype)


def _assert_gelu_close(y, want, x):
    """GELU(x) against eager's, but at +inf: there eager's vectorised float32/bfloat16
    kernel gives NaN, its float64 one (and the decomposition Kitsune compiles) inf."""
    inf = x == math.inf
    assert torch.all(y[inf] == math.inf)
    torch.testing.assert_close(y[~inf], want[~inf], equal_nan=True)


def _check_gelu(x, grad):
    """Compiled GELU's value and gradient against eager's; the C it built."""
    sources = _new_sources()
    (y, dx), (want_y, want_dx) = _gelu_fwd_bwd(x, grad, compiled=True), _gelu_fwd_bwd(x, grad, compiled=False)
    torch.testing.assert_close(dx, want_dx, equal_nan=True)
    _assert_gelu_close(y, want_y, x)
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and stats["num_fused"] >= 1, stats
    return sources()


def test_gelu_backward_kernel_computes_one_exp():
    source = _check_gelu(_specials((64, 300)), torch.randn(64, 300))
    backward = [k for k in _kernels(source) if "kitsune_erff_e(" in k]
    assert len(backward) == 1, source
    # the erf takes the pdf's exp: one expf in the kernel, no erf that computes its own
    assert backward[0].count("expf(") == 1 and "kitsune_erff(" not in backward[0], backward[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 1000), (7,), (0, 5), (2, 0)])
def test_gelu_forward_backward_with_specials(shape, dtype):
    x = _specials(shape, dtype) if math.prod(shape) >= 16 else torch.randn(shape).to(dtype)
    _check_gelu(x, torch.randn(shape).to(dtype))


def test_gelu_of_a_non_contiguous_input():
    x = _specials((40, 64)).t()[:, ::2]
    assert not x.is_contiguous()
    _check_gelu(x, torch.randn(x.shape))


def test_gelu_of_a_broadcast_sum():
    """Gradients of both operands: the bias's sums over the broadcast rows."""
    def f(x, b):
        return F.gelu(x + b)

    x, b, grad = _specials((33, 8, 16)), torch.randn(8, 1) * 2, torch.randn(33, 8, 16)
    results = []
    for fn in (torch.compile(f, backend="kitsune", dynamic=False), f):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xs, bs)
        y.backward(grad)
        results.append((y, xs.grad, bs.grad))
    (y, dx, db), (want_y, want_dx, want_db) = results
    _assert_gelu_close(y, want_y, x + b)
    torch.testing.assert_close(dx, want_dx, equal_nan=True)
    torch.testing.assert_close(db, want_db, equal_nan=True)


# the written-out formulas hold more operations than a kernel does by default
WIDE = make_backend(FusionConfig(max_fusion_size=32))


def _formula(x, grad, c1=SQRT1_2, c2=-0.5):
    """GELU's derivative times grad as PyTorch's decomposition writes it."""
    cdf = (torch.erf(x * c1) + 1) * 0.5
    pdf = torch.exp(x * x * c2) * INV_SQRT_2PI
    return grad * (cdf + x * pdf)


@pytest.mark.parametrize("reduce", [None, -1, 0])  # pointwise, row sum, column (outer) sum
def test_explicit_formula_shares_the_exp_in_every_kernel_kind(reduce):
    def f(x, grad):
        out = _formula(x, grad)
        return out if reduce is None else (out, out.sum(reduce))

    x, grad = _specials((256, 160)), torch.randn(256, 160)
    sources = _new_sources()
    got = torch.compile(f, backend=WIDE, dynamic=False)(x, grad)
    want = f(x, grad)
    for g, w in zip(got if reduce is not None else [got], want if reduce is not None else [want]):
        torch.testing.assert_close(g, w, equal_nan=True)
    kernels = [k for k in _kernels(sources()) if "erf" in k]
    assert len(kernels) == 1, kernels
    kind = {None: "for (int64_t x = 0;", -1: "for (int64_t row = 0;", 0: "const int64_t row0 = t *"}[reduce]
    assert kind in kernels[0], kernels[0]
    assert "kitsune_erff_e(" in kernels[0] and kernels[0].count("expf(") == 1, kernels[0]


def _erf_plus_exp_spec(dtype, swap_erf: bool, swap_exp: bool) -> KernelSpec:
    """erf(a / sqrt 2) + exp(a * a * -0.5), the constants on either side of their products."""
    a = load(0, Index.var(), dtype)
    z = SQRT1_2 * a if swap_erf else a * SQRT1_2
    e = call("exp", -0.5 * (a * a) if swap_exp else (a * a) * -0.5)
    return KernelSpec("k", 4096, (KernelInput("in0", dtype),),
                      (KernelOutput("out0", dtype, Index.var(), call("erf", z) + e),))


@pytest.mark.parametrize("swap_erf", [False, True])
@pytest.mark.parametrize("swap_exp", [False, True])
def test_either_operand_order_shares(swap_erf, swap_exp):
    spec = _erf_plus_exp_spec(torch.float32, swap_erf, swap_exp)
    (kernel,) = _kernels(emit_kernel(spec, "kitsune_k"))
    assert kernel.count("expf(") == 1 and "kitsune_erff_e(" in kernel, kernel
    assert "-0x1.0000000000000p-1" not in kernel, kernel  # a * a * -0.5 is not computed at all
    (built,) = compile_kernels([spec])
    x, out = _specials((4096,)), torch.empty(4096)
    built([x], [out])
    torch.testing.assert_close(out, torch.erf(x * SQRT1_2) + torch.exp(x * x * -0.5), equal_nan=True)


def test_other_constants_keep_two_exps():
    """erf(x * 0.7) and exp(x * x * -0.5) are not the same exponential, nor are
    erf(x / sqrt 2) and exp(x * x * -0.25)."""
    x, grad = _specials((64, 64)), torch.randn(64, 64)
    for c1, c2 in ((0.7, -0.5), (SQRT1_2, -0.25)):
        torch._dynamo.reset()
        sources = _new_sources()
        got = torch.compile(lambda a, b: _formula(a, b, c1, c2), backend=WIDE, dynamic=False)(x, grad)
        torch.testing.assert_close(got, _formula(x, grad, c1, c2), equal_nan=True)
        (kernel,) = _kernels(sources())
        assert "kitsune_erff_e(" not in kernel and "kitsune_erff(" in kernel and kernel.count("expf(") == 1


def test_double_kernel_shares_nothing():
    (kernel,) = _kernels(emit_kernel(_erf_plus_exp_spec(torch.float64, False, False), "kitsune_k"))
    assert "kitsune_erff" not in kernel and kernel.count("erf(") == 1 and kernel.count("exp(") == 1, kernel


def test_double_gelu_backward_is_unchanged():
    """float64 keeps libm's erf and exp: nothing is shared."""
    x, grad = _specials((32, 50), torch.float64), torch.randn(32, 50, dtype=torch.float64)
    source = _check_gelu(x, grad)
    backward = [k for k in _kernels(source) if "exp(" in k]
    assert len(backward) == 1, source
    assert "kitsune_erff" not in backward[0] and "erf(" in backward[0] and backward[0].count("exp(") == 1
