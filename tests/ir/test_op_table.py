"""Every row of the op table (`kitsune.ir.ops.POINTWISE_OPS`) against eager PyTorch,
through each code generator ("triton": generated Triton kernels in Triton's
interpreter; "cpu": generated C kernels).

How one test works (one test = one op case x one dtype x one backend):

* Inputs come from value pools with the awkward values: NaN, +-Inf, -0.0, 0,
  subnormals, large values, integer extremes (wrap-around), shift amounts past
  the bit width, zero float divisors.
* Every case is applied to several input layouts in ONE traced graph: all value
  combinations through broadcasting, (3,1,5) with (4,5), transposed, sliced,
  expanded (stride 0), zero-size and 0-dim inputs. Each layout is an independent
  fusion group, so one `make_fx` trace + one `compile_graph` call checks all of
  them (a torch.compile per case would cost ~10x more; CI has 2 cores).
* A single op is never fused ("single operation: nothing to fuse"), so the first
  tensor argument goes through `aten.clone` first (the identity row of the
  table, which keeps -0.0/NaN/Inf and integer bits intact). Every test asserts
  that each op node really ran in a generated kernel, so nothing passes
  silently through PyTorch.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.compiler import compile_graph
from kitsune.ir.ops import POINTWISE_OPS
from kitsune.report.stats import GLOBAL_STATS

aten = torch.ops.aten
prims = torch.ops.prims

NAN, INF = math.nan, math.inf
DTYPES = [torch.bool, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- backends -------------------------------------------------------------------

def _available(name: str) -> bool:
    module = importlib.import_module(f"kitsune.codegen.{name}")
    return hasattr(module, "compile_kernel") or hasattr(module, "compile_kernels")


@pytest.fixture(params=["triton", "cpu"])
def backend(request, monkeypatch):
    if not _available(request.param):
        pytest.skip(f"{request.param} backend not built yet")
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    kitsune.reset_fusion_stats()
    yield request.param


# -- value pools ----------------------------------------------------------------

I32_MIN, I32_MAX = -2**31, 2**31 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1

FLOAT_POOL = [NAN, INF, -INF, -0.0, 0.0, 1.0, -1.0, 0.5, -2.5, 1.5, 0.3, -0.75, 1e-6, -1e-40,
              1e4, -7e4, 3.0, 100.5, 1e30, 2.0, -88.75]
INT_POOL = {
    torch.int32: [0, 1, -1, 2, -3, 7, -9, 100, -100, 12345, 46341, -46341, 65536, I32_MAX, I32_MIN,
                  I32_MAX - 1, I32_MIN + 1, 1000000],
    torch.int64: [0, 1, -1, 2, -3, 7, -9, 100, -100, 12345, 3037000500, -3037000500, 2**32, I64_MAX, I64_MIN,
                  I64_MAX - 1, I64_MIN + 1, 10**12],
}
# Integer divisors: no 0 (eager raises, GPUs are undefined; see the zero-division
# test) and no -1 (MIN / -1 overflows: a hardware trap on x86).
INT_DIVISORS = {
    torch.int32: [1, 2, -2, 3, -3, 7, -9, 100, 12345, 65536, I32_MAX, I32_MIN, -128],
    torch.int64: [1, 2, -2, 3, -3, 7, -9, 100, 12345, 2**32, I64_MAX, I64_MIN, -128],
}
SHIFTS = [0, 1, 3, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, -1, -8]
BOUNDS = {"float": [NAN, -INF, -1.0, -0.0, 0.5, 2.0, INF], torch.int32: [I32_MIN, -3, 0, 7, I32_MAX],
          torch.int64: [I64_MIN, -3, 0, 7, I64_MAX], torch.bool: [False, True]}


def pool(role: str, dtype: torch.dtype) -> list:
    role = role.rstrip("0")
    if role == "c":                      # conditions and masks: always bool
        return [False, True, True]
    if dtype == torch.bool:
        return [False, True]
    if role == "b":
        return BOUNDS["float" if dtype.is_floating_point else dtype]
    if dtype.is_floating_point:
        return FLOAT_POOL
    if role == "d":
        return INT_DIVISORS[dtype]
    if role == "s":
        return SHIFTS
    if role == "e":                      # integer exponents: eager rejects negative ones
        return [0, 1, 2, 3, 5, 31, 62]
    return INT_POOL[dtype]


def role_dtype(role: str, dtype: torch.dtype) -> torch.dtype:
    return torch.bool if role.rstrip("0") == "c" else dtype


def fill(role: str, dtype: torch.dtype, shape, offset: int) -> torch.Tensor:
    values = pool(role, dtype)
    n = math.prod(shape)
    data = [values[(offset + i) % len(values)] for i in range(n)]
    return torch.tensor(data, dtype=role_dtype(role, dtype)).reshape(shape)


# -- layouts: how the k tensor arguments of a case are shaped ----------------------

def _outer(roles, dtype):
    """Every combination of pool values: argument j varies along dim j (broadcasting)."""
    dims = [r for r in roles if not r.endswith("0")]
    out, j = [], 0
    for r in roles:
        if r.endswith("0"):
            out.append(fill(r, dtype, (), 3))
            continue
        n = len(pool(r, dtype))
        out.append(torch.tensor(pool(r, dtype), dtype=role_dtype(r, dtype)).reshape((n,) + (1,) * (len(dims) - 1 - j)))
        j += 1
    return out


def _shaped(shapes):
    def make(roles, dtype):
        out, j = [], 0
        for k, r in enumerate(roles):
            if r.endswith("0"):
                out.append(fill(r, dtype, (), 5 * k + 1))
            else:
                out.append(shapes[j](r, dtype, 5 * k + 2))
                j += 1
        return out
    return make


def _contig(shape):
    return lambda r, d, o: fill(r, d, shape, o)


def _transposed(r, d, o):
    return fill(r, d, (5, 4), o).t()


def _sliced(r, d, o):
    return fill(r, d, (4, 10), o)[:, ::2]


def _expanded(r, d, o):
    return fill(r, d, (5,), o).expand(4, 5)


def _scalar(r, d, o):
    return fill(r, d, (), o)


LAYOUTS: dict[str, Callable] = {
    "outer": _outer,
    "bcast": _shaped([_contig((3, 1, 5)), _contig((4, 5)), _contig((1, 5))]),
    "expanded": _shaped([_expanded, _contig((4, 5)), _transposed]),
    "transposed": _shaped([_transposed, _transposed, _transposed]),
    "sliced": _shaped([_sliced, _transposed, _contig((4, 5))]),
    "empty": _shaped([_contig((0, 5)), _contig((5,)), _contig((1, 5))]),
    "0dim": _shaped([_scalar, _scalar, _scalar]),
    "0dim_mix": _shaped([_contig((4, 5)), _scalar, _scalar]),
}


# -- the cases ------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    op: Any                                 # the table row under test (must appear in the graph)
    roles: tuple                            # tensor arguments: x/y values, d divisor, s shift, e exponent,
                                            # b clamp bound, c bool condition; suffix 0 = always 0-dim
    build: Callable                         # build(variant, *tensors) -> tensor
    variants: list = field(default_factory=lambda: [None])
    dtypes: tuple = tuple(DTYPES)
    loose: bool = False                     # libm function: see TOLERANCE


def _alpha(op):
    return lambda v, a, b: op(a, b) if v is None else op(a, b, alpha=v)


SCALARS = [3, -2.5, INF, -0.0]
DIV_SCALARS = [3, -2, 2.5, -0.75, 0.0, -0.0]
CMP_SCALARS = [0, 2.5, NAN, -INF]

CASES: list[Case] = [
    Case("add.Tensor", aten.add.Tensor, ("x", "y"), _alpha(aten.add.Tensor), [None, 2, -0.5]),
    Case("add.Scalar", aten.add.Scalar, ("x",), lambda v, a: aten.add.Scalar(a, v), SCALARS),
    Case("sub.Tensor", aten.sub.Tensor, ("x", "y"), _alpha(aten.sub.Tensor), [None, 3, 1.5]),
    Case("sub.Scalar", aten.sub.Scalar, ("x",), lambda v, a: aten.sub.Scalar(a, v), SCALARS),
    Case("rsub.Tensor", aten.rsub.Tensor, ("x", "y"), _alpha(aten.rsub.Tensor), [None, -2]),
    Case("rsub.Scalar", aten.rsub.Scalar, ("x",), lambda v, a: aten.rsub.Scalar(a, v), SCALARS),
    Case("mul.Tensor", aten.mul.Tensor, ("x", "y"), lambda v, a, b: aten.mul.Tensor(a, b)),
    Case("mul.Scalar", aten.mul.Scalar, ("x",), lambda v, a: aten.mul.Scalar(a, v), SCALARS),
    Case("div.Tensor", aten.div.Tensor, ("x", "y"), lambda v, a, b: aten.div.Tensor(a, b)),
    Case("div.Scalar", aten.div.Scalar, ("x",), lambda v, a: aten.div.Scalar(a, v), [3, -0.0, 0, 0.1]),
    Case("div.Tensor_mode", aten.div.Tensor_mode, ("x", "d"),
         lambda v, a, b: aten.div.Tensor_mode(a, b, rounding_mode=v), ["trunc", "floor"]),
    Case("div.Scalar_mode", aten.div.Scalar_mode, ("x",),
         lambda v, a: aten.div.Scalar_mode(a, v[1], rounding_mode=v[0]),
         [("floor", -2), ("trunc", 3), ("floor", 2.5), ("trunc", -0.75), ("floor", 0.0), ("trunc", -0.0)]),
    Case("floor_divide", aten.floor_divide.default, ("x", "d"), lambda v, a, b: aten.floor_divide.default(a, b)),
    Case("floor_divide.Scalar", aten.floor_divide.Scalar, ("x",),
         lambda v, a: aten.floor_divide.Scalar(a, v), DIV_SCALARS),
    Case("remainder.Tensor", aten.remainder.Tensor, ("x", "d"), lambda v, a, b: aten.remainder.Tensor(a, b)),
    Case("remainder.Scalar", aten.remainder.Scalar, ("x",), lambda v, a: aten.remainder.Scalar(a, v), DIV_SCALARS),
    Case("fmod.Tensor", aten.fmod.Tensor, ("x", "d"), lambda v, a, b: aten.fmod.Tensor(a, b)),
    Case("fmod.Scalar", aten.fmod.Scalar, ("x",), lambda v, a: aten.fmod.Scalar(a, v), DIV_SCALARS),
    Case("neg", aten.neg.default, ("x",), lambda v, a: aten.neg.default(a)),
    Case("abs", aten.abs.default, ("x",), lambda v, a: aten.abs.default(a)),
    Case("sign", aten.sign.default, ("x",), lambda v, a: aten.sign.default(a)),
    Case("sgn", aten.sgn.default, ("x",), lambda v, a: aten.sgn.default(a)),
    Case("pow.Tensor_Scalar", aten.pow.Tensor_Scalar, ("x",), lambda v, a: aten.pow.Tensor_Scalar(a, v),
         [2, 3, 0.5, -0.5, -1, -2, 0, 1, 2.5, -3, 5, 1 / 3], loose=True),
    Case("pow.Tensor_Tensor", aten.pow.Tensor_Tensor, ("x", "e"),
         lambda v, a, b: aten.pow.Tensor_Tensor(a, b), loose=True),
    Case("pow.Scalar", aten.pow.Scalar, ("e",), lambda v, a: aten.pow.Scalar(v, a), [2.5, -1.5, 0.0, 10, 2],
         loose=True),
    *[Case(name, getattr(aten, name).default, ("x",), lambda v, a, _op=getattr(aten, name).default: _op(a),
           loose=True)
      for name in ("exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "sigmoid", "tanh",
                   "erf", "erfc", "erfinv", "sin", "cos")],
    Case("reciprocal", aten.reciprocal.default, ("x",), lambda v, a: aten.reciprocal.default(a)),
    Case("atan2", aten.atan2.default, ("x", "y"), lambda v, a, b: aten.atan2.default(a, b), loose=True),
    Case("hypot", aten.hypot.default, ("x", "y"), lambda v, a, b: aten.hypot.default(a, b), loose=True),
    *[Case(name, getattr(aten, name).default, ("x",), lambda v, a, _op=getattr(aten, name).default: _op(a))
      for name in ("floor", "ceil", "trunc", "round", "frac", "relu", "isnan", "isinf", "logical_not",
                   "bitwise_not", "clone", "lift_fresh_copy")],
    Case("maximum", aten.maximum.default, ("x", "y"), lambda v, a, b: aten.maximum.default(a, b)),
    Case("minimum", aten.minimum.default, ("x", "y"), lambda v, a, b: aten.minimum.default(a, b)),
    Case("clamp", aten.clamp.default, ("x",), lambda v, a: aten.clamp.default(a, *v),
         [(-1.5, 2.5), (None, 0), (1, None), (2, -1), (NAN, None), (-INF, INF)]),
    Case("clamp.Tensor", aten.clamp.Tensor, ("x", "b", "b"),
         lambda v, a, lo, hi: aten.clamp.Tensor(a, lo if v != "max" else None, hi if v != "min" else None),
         ["both", "min", "max"]),
    Case("clamp_min", aten.clamp_min.default, ("x",), lambda v, a: aten.clamp_min.default(a, v), [0.5, -2, NAN]),
    Case("clamp_min.Tensor", aten.clamp_min.Tensor, ("x", "b"), lambda v, a, b: aten.clamp_min.Tensor(a, b)),
    Case("clamp_max", aten.clamp_max.default, ("x",), lambda v, a: aten.clamp_max.default(a, v), [-1, 2.5, NAN]),
    Case("clamp_max.Tensor", aten.clamp_max.Tensor, ("x", "b"), lambda v, a, b: aten.clamp_max.Tensor(a, b)),
    Case("nan_to_num", aten.nan_to_num.default, ("x",), lambda v, a: aten.nan_to_num.default(a, *v),
         [(), (1.0, 100.0, -100.0), (-0.0, None, None), (NAN, INF, None)]),
    Case("where.self", aten.where.self, ("c", "x", "y"), lambda v, c, a, b: aten.where.self(c, a, b)),
    Case("where.ScalarSelf", aten.where.ScalarSelf, ("c", "y"), lambda v, c, b: aten.where.ScalarSelf(c, v, b),
         [-0.0, 7, True]),
    Case("where.ScalarOther", aten.where.ScalarOther, ("c", "x"),
         lambda v, c, a: aten.where.ScalarOther(c, a, v), [NAN, -3, False]),
    Case("where.Scalar", aten.where.Scalar, ("c",), lambda v, c: aten.where.Scalar(c, *v),
         [(1.5, -0.0), (3, -4), (True, False), (NAN, INF)], dtypes=(torch.bool,)),
    Case("masked_fill.Scalar", aten.masked_fill.Scalar, ("x", "c"),
         lambda v, a, m: aten.masked_fill.Scalar(a, m, v), [-1.5, 7, NAN, True]),
    Case("masked_fill.Tensor", aten.masked_fill.Tensor, ("x", "c", "y0"),
         lambda v, a, m, f: aten.masked_fill.Tensor(a, m, f)),
    *[Case(f"{name}.Tensor", getattr(aten, name).Tensor, ("x", "y"),
           lambda v, a, b, _op=getattr(aten, name).Tensor: _op(a, b))
      for name in ("eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or", "bitwise_xor")],
    *[Case(f"{name}.Scalar", getattr(aten, name).Scalar, ("x",),
           lambda v, a, _op=getattr(aten, name).Scalar: _op(a, v), CMP_SCALARS)
      for name in ("eq", "ne", "lt", "le", "gt", "ge")],
    *[Case(f"{name}.Scalar", getattr(aten, name).Scalar, ("x",),
           lambda v, a, _op=getattr(aten, name).Scalar: _op(a, v), [5, -1, 0, True])
      for name in ("bitwise_and", "bitwise_or", "bitwise_xor")],
    *[Case(name, getattr(aten, name).default, ("x", "y"), lambda v, a, b, _op=getattr(aten, name).default: _op(a, b))
      for name in ("logical_and", "logical_or", "logical_xor")],
    *[Case(f"{name}.Tensor", getattr(aten, name).Tensor, ("x", "s"),
           lambda v, a, b, _op=getattr(aten, name).Tensor: _op(a, b))
      for name in ("bitwise_left_shift", "bitwise_right_shift", "__lshift__", "__rshift__")],
    *[Case(f"{name}.{overload}", getattr(getattr(aten, name), overload), ("x",),
           lambda v, a, _op=getattr(getattr(aten, name), overload): _op(a, v), [3, 0, 31, 33, 64, -1])
      for name, overload in (("bitwise_left_shift", "Tensor_Scalar"), ("bitwise_right_shift", "Tensor_Scalar"),
                             ("__lshift__", "Scalar"), ("__rshift__", "Scalar"))],
    Case("copy", aten.copy.default, ("x", "y"), lambda v, a, b: aten.copy.default(a, b)),
]

# Rows checked by dedicated tests below (conversions and fills).
SEPARATELY_TESTED = {prims.convert_element_type.default, aten._to_copy.default, aten.full.default,
                     aten.scalar_tensor.default}

# Rows that must not be generated for some dtypes; the planner refuses them with a reason.
def expected_refusal(case: Case, out_dtype: torch.dtype) -> str | None:
    if case.op in (aten.pow.Tensor_Tensor, aten.pow.Scalar) and not out_dtype.is_floating_point:
        return "integer"
    return None


# Tolerances. Integers and bools are always compared exactly (assert_close does
# that for them). Floats use assert_close's defaults, except for `loose` cases
# (libm functions): the C backend calls the platform libm (glibc, ~1-4 ulp),
# eager PyTorch uses its own vectorised implementations (Sleef), and Triton on a
# GPU uses libdevice; none is correctly rounded, so float32 results may differ
# by a few ulp, more than the default rtol=1.3e-6 (~10 ulp) allows near
# catastrophic points (e.g. pow with large exponents, erfinv near +-1, log10 computed as
# log(x) * (1/ln 10) with one extra rounding). float16/bfloat16 are computed in
# float32 and rounded once, so one float32 ulp can flip the final rounding: one
# ulp of the narrow type, which the default rtol already covers.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-12)}

# Ops whose sign of a zero result is unspecified in eager (std::max/min of -0.0
# and 0.0 depends on argument order and on the vectorised vs scalar path).
SIGNED_ZERO_UNSPECIFIED = {aten.maximum.default, aten.minimum.default, aten.clamp.default, aten.clamp.Tensor,
                           aten.clamp_min.default, aten.clamp_min.Tensor, aten.clamp_max.default,
                           aten.clamp_max.Tensor, aten.relu.default}


# -- building and checking ----------------------------------------------------------

@dataclass
class Sample:
    label: str
    variant: Any
    tensors: list


def _eager_ok(case: Case, variant, tensors) -> bool:
    try:
        case.build(variant, *[t.clone() for t in tensors])
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


def supported_variants(case: Case, dtype: torch.dtype) -> list:
    """The variants eager PyTorch accepts for this dtype: 'every dtype it supports'."""
    if dtype not in case.dtypes:
        return []
    tensors = _outer(case.roles, dtype)
    return [v for v in case.variants if _eager_ok(case, v, tensors)]


def make_samples(case: Case, dtype: torch.dtype) -> list[Sample]:
    variants = supported_variants(case, dtype)
    samples = []
    for i, variant in enumerate(variants):
        # The first variant goes through every layout, the others through all value combinations only.
        layouts = LAYOUTS if i == 0 else {"outer": LAYOUTS["outer"]}
        for name, make in layouts.items():
            if name == "0dim_mix" and sum(not r.endswith("0") for r in case.roles) < 2:
                continue
            tensors = make(case.roles, dtype)
            if _eager_ok(case, variant, tensors):
                samples.append(Sample(f"{case.id}[{_dt(dtype)}, {name}, variant={variant!r}]", variant, tensors))
    return samples


def _program(build, samples):
    """One function computing every sample: build(variant, clone(t0), *rest) for each."""
    counts = [len(s.tensors) for s in samples]

    def program(*flat):
        outs, pos = [], 0
        for s, n in zip(samples, counts):
            args = list(flat[pos:pos + n])
            pos += n
            args[0] = aten.clone.default(args[0])  # a second op: a lone op is never fused
            outs.append(build(s.variant, *args))
        return tuple(outs)
    return program


def compile_program(program, flat):
    """Trace to an aten graph and compile it with Kitsune; returns (gm, compiled, stats record)."""
    gm = make_fx(program, tracing_mode="fake")(*flat)
    kitsune.reset_fusion_stats()
    compiled = compile_graph(gm, flat)
    (record,) = GLOBAL_STATS.graphs
    return gm, compiled, record


def assert_same(got, want, label, op=None, loose=False):
    assert isinstance(got, torch.Tensor), f"{label}: got {type(got).__name__}"
    assert got.dtype == want.dtype, f"{label}: dtype {got.dtype} != eager {want.dtype}"
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != eager {tuple(want.shape)}"
    tol = TOLERANCE.get(want.dtype, {}) if loose else {}
    torch.testing.assert_close(got, want, equal_nan=True, **tol, msg=lambda m: f"{label}: {m}")
    if want.numel() > 1 and not any(s == 1 for s in want.shape):
        assert got.stride() == want.stride(), f"{label}: strides {got.stride()} != eager {want.stride()}"
    if want.dtype.is_floating_point and op not in SIGNED_ZERO_UNSPECIFIED:
        zeros = (want == 0) & (got == 0)
        bad = zeros & (torch.signbit(want) != torch.signbit(got))
        if bad.any():
            i = bad.nonzero()[0].tolist()
            raise AssertionError(f"{label}: sign of zero differs at {i}: got {got[tuple(i)].item()}, "
                                 f"eager {want[tuple(i)].item()}")


def check_case(case: Case, dtype: torch.dtype, samples: list[Sample]):
    flat = [t for s in samples for t in s.tensors]
    program = _program(case.build, samples)
    want = program(*flat)
    gm, compiled, record = compile_program(program, flat)
    op_nodes = [n for n in gm.graph.nodes if n.target is case.op]
    assert len(op_nodes) == len(samples), f"{case.op} not traced as itself: {gm.code}"
    fused_nodes = {name for _, nodes, _ in record.groups for name in nodes}
    assert record.fallbacks == [], record.fallbacks
    for s, node, w in zip(samples, op_nodes, want):
        refusal = expected_refusal(case, w.dtype)
        if refusal:
            reasons = [d.reason for d in record.decisions if not d.fused and d.nodes == (node.name,)]
            assert any(refusal in r for r in reasons), f"{s.label}: expected a refusal, got {reasons}"
        else:
            assert node.name in fused_nodes, f"{s.label}: not fused; decisions: {record.decisions}"
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == []
    if any(not expected_refusal(case, w.dtype) for w in want):
        assert stats["num_fused"] >= 1
    got = compiled(*flat)
    assert len(got) == len(want)
    for s, g, w in zip(samples, got, want):
        assert_same(g, w, s.label, case.op, case.loose)


# -- known bugs: (case id, dtype or None for all) -> reason -----------------------------

_BOOL_COMPARE = ("`(x != 0)` and `(x < 0) != (y < 0)` in the formula call Value.__eq__/__ne__ (Python bools), "
                 "so the formula builds where(<bool>, ...) and kernel build fails")
KNOWN_BUGS: dict = {
    # Filled in from test runs; each entry has a reproducer in the report.
}


def _params():
    params = []
    for case in CASES:
        for dtype in DTYPES:
            if not supported_variants(case, dtype):
                continue
            marks = []
            reason = KNOWN_BUGS.get((case.id, dtype)) or KNOWN_BUGS.get((case.id, None))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(pytest.param(case, dtype, id=f"{case.id}-{_dt(dtype)}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "dtype"), _params())
def test_op_matches_eager(backend, case, dtype):
    samples = make_samples(case, dtype)
    assert samples
    check_case(case, dtype, samples)


def test_every_table_row_has_a_case():
    covered = {c.op for c in CASES} | SEPARATELY_TESTED
    missing = [str(op) for op in POINTWISE_OPS if op not in covered]
    assert not missing, f"op table rows without a test case: {missing}"


def test_every_case_covers_some_dtype():
    for case in CASES:
        assert any(supported_variants(case, d) for d in DTYPES), case.id
