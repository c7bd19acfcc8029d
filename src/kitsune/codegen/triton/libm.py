"""The math functions generated Triton kernels call, as `libm.<name>(...)`.

On a GPU `libm` is CUDA's libdevice; `round_bf16` rounds a float32 to the
nearest bfloat16 (ties to even) and widens it back. Triton's interpreter (`TRITON_INTERPRET=1`,
used by the CPU test suite) cannot call libdevice, so there each function is
evaluated with PyTorch on the numpy arrays that back the interpreter's
tensors. The generated source is the same in both modes; only what the name
`libm` refers to changes.
"""
from __future__ import annotations

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if not INTERPRETED:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice as libm  # noqa: F401

    @triton.jit
    def round_bf16(x):
        return x.to(tl.bfloat16).to(tl.float32)
else:
    import numpy as np
    import triton
    import torch
    import triton.language as tl
    from kitsune._compat import triton_interpreter_types
    InterpreterBuilder, TensorHandle = triton_interpreter_types() or (None, None)

    def _data(x):
        if isinstance(x, tl.tensor):
            return x.handle.data, x
        return np.asarray(x), None

    def _wrap(fn):
        def apply(*args):
            datas, ref = [], None
            for a in args:
                d, t = _data(a)
                datas.append(d)
                ref = ref if ref is not None else t
            tensors = [torch.from_numpy(np.ascontiguousarray(d)) for d in datas]
            tensors = torch.broadcast_tensors(*tensors)
            result = fn(*tensors).numpy().astype(datas[0].dtype if ref is None else ref.handle.data.dtype)
            shapes = [a.type for a in args if isinstance(a, tl.tensor) and a.type.is_block()]
            ty = shapes[0] if shapes else ref.type
            return tl.tensor(TensorHandle(result, ref.handle.dtype.scalar), ty)
        return apply

    class libm:  # noqa: N801 - stands in for the libdevice module
        """libdevice's names, computed with PyTorch (interpreter only)."""

        exp = staticmethod(_wrap(torch.exp))
        exp2 = staticmethod(_wrap(torch.exp2))
        expm1 = staticmethod(_wrap(torch.expm1))
        log = staticmethod(_wrap(torch.log))
        log1p = staticmethod(_wrap(torch.log1p))
        log2 = staticmethod(_wrap(torch.log2))
        sqrt = staticmethod(_wrap(torch.sqrt))
        rsqrt = staticmethod(_wrap(torch.rsqrt))
        tanh = staticmethod(_wrap(torch.tanh))
        erf = staticmethod(_wrap(torch.erf))
        erfc = staticmethod(_wrap(torch.erfc))
        erfinv = staticmethod(_wrap(torch.erfinv))
        sin = staticmethod(_wrap(torch.sin))
        cos = staticmethod(_wrap(torch.cos))
        atan2 = staticmethod(_wrap(torch.atan2))
        hypot = staticmethod(_wrap(torch.hypot))
        pow = staticmethod(_wrap(torch.pow))
        fmod = staticmethod(_wrap(torch.fmod))
        floor = staticmethod(_wrap(torch.floor))
        ceil = staticmethod(_wrap(torch.ceil))
        trunc = staticmethod(_wrap(torch.trunc))
        rint = staticmethod(_wrap(torch.round))
        div_rn = staticmethod(_wrap(torch.div))


    # The interpreter's own float32 -> bfloat16 cast truncates; this rounds to
    # nearest even like the hardware.
    round_bf16 = _wrap(lambda t: t.to(torch.bfloat16).to(torch.float32))

    def _bool_result(compare):
        def create(self, lhs, rhs):
            out = compare(self, lhs, rhs)
            return TensorHandle(out.data.astype(bool), tl.int1)
        return create

    # The interpreter labels a comparison's result with its operands' type
    # (float32 for `x != 0` on floats), so splatting a scalar comparison to a
    # block makes floats, and `&` with a block of bools then fails in numpy.
    # A GPU has no such problem: give comparisons the int1 type they have there.
    for _name in dir(InterpreterBuilder) if InterpreterBuilder is not None else ():
        if _name.startswith(("create_icmp", "create_fcmp")):
            setattr(InterpreterBuilder, _name, _bool_result(getattr(InterpreterBuilder, _name)))


# Combine functions for tl.reduce and reduction loops (plain Triton: they run
# in the interpreter too). max/min propagate NaN, like eager.
@triton.jit
def max_nan(a, b):
    # one max.NaN instruction on the GPU (a compare-and-select chain made
    # looped max reductions latency-bound: 59 % of copy rate against 98 % for sum)
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def check_index(position, bound, live):
    """`position` where 0 <= position < bound, else 0 (so no read leaves the
    tensor), and a device assert where a live position is out of range: eager
    raises there. The assert is on where the kernel is compiled with debug
    (a no-op in Triton's interpreter)."""
    inside = (position >= 0) & (position < bound)
    tl.device_assert(inside | (live == 0), "index out of bounds")
    return tl.where(inside, position, 0)


@triton.jit
def mul_combine(a, b):
    return a * b


@triton.jit
def online_scale(a, m):
    """exp(a - m) for online softmax; 0 where the running maximum m is still
    -inf (then a is -inf too, and a - m would be NaN)."""
    return tl.where(m == float("-inf"), 0.0, tl.exp(a - m))


@triton.jit
def one_plus_erf(z):
    """1 + erf(z) for float32 z, as erfc(-z): exp2(Q(|z|)) below zero and
    2 - exp2(Q(|z|)) above, Q a degree-7 least-squares fit of log2(erfc(t)) on
    [0, 3.92] (relative error 2^-17.8); beyond 3.92, where float32 erf is +-1,
    exactly 0 or 2. No cancellation near -1 (1 + erf(z) loses all its digits
    there), and about a third of libdevice erf's instructions: layer_norm+GELU
    on 16384x4096 bf16 took 78 instead of 122 us on an H200. Used only where
    the result reaches bfloat16/float16 outputs through products alone
    (`kitsune.codegen.kernel.reaches_only_low_precision`)."""
    t = tl.abs(z)
    q = -2.1764659322798252e-05
    q = q * t + 0.0005066675366833806
    q = q * t + -0.005338572897017002
    q = q * t + 0.03422942012548447
    q = q * t + -0.15288831293582916
    q = q * t + -0.9167604446411133
    q = q * t + -1.6281540393829346
    q = q * t + 6.165631930343807e-06
    e = tl.where(t > 3.92, 0.0, tl.exp2(q))  # NaN stays NaN
    return tl.where(z < 0, e, 2.0 - e)


@triton.jit
def gelu_erf(y):
    """GELU's y * 0.5 * (1 + erf(y / sqrt(2))) for float32 y whose product
    reaches only bfloat16/float16 outputs, written as y * P with P = h below
    zero and 1 - h above, h = 0.5 * erfc(|y| / sqrt(2)) = exp2(Q(|y|)), Q a
    degree-7 fit of log2(0.5 * erfc(t / sqrt(2))) on [0, 6] (relative error
    2^-17.5 in float32). The scaling by 1/sqrt(2), the 2 - e and the product by
    0.5 of `one_plus_erf` are folded into the coefficients, and Q falls
    monotonically beyond the fit (its leading coefficient is negative: 2^Q(12)
    is 2^-111, exp2 flushes to 0 from |y| = 13.3), so no range test is needed:
    11 instructions an element instead of 18. Where float32 erf is already -1
    (y < -5.54), eager returns 0 and this the tiny true value (float64's);
    NaN at -inf and inf at +inf as eager. layer_norm+GELU on 16384x4096 bf16
    on an H200: 122 us with libdevice erf, 81 with one_plus_erf, 75.8 with a
    degree-6 gelu_erf and its range test (benchmarks/probes/probe_generated.py)."""
    t = tl.abs(y)
    q = -1.8354097163764478e-06
    q = q * t + 6.161118539177576e-05
    q = q * t + -0.0009306341109899466
    q = q * t + 0.008508352227563168
    q = q * t + -0.05396108188541749
    q = q * t + -0.4584632975814083
    q = q * t + -1.1512515369595653
    q = q * t + -0.9999952372482187
    h = tl.exp2(q)
    return y * tl.where(y < 0, h, 1.0 - h)
