"""The math functions generated Triton kernels call, as `libm.<name>(...)`.

On a GPU this module re-exports CUDA's libdevice, plus `round_bf16` (round a
float32 to the nearest bfloat16, ties to even, and widen it back). Triton's interpreter (`TRITON_INTERPRET=1`,
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
    from triton.language.extra.libdevice import *  # noqa: F401,F403

    @triton.jit
    def round_bf16(x):
        return x.to(tl.bfloat16).to(tl.float32)
else:
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

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

    # libdevice's names, computed with PyTorch (interpreter only). The
    # interpreter's own float32 -> bfloat16 cast truncates; round_bf16 rounds
    # to nearest even like the hardware.
    exp = _wrap(torch.exp)
    exp2 = _wrap(torch.exp2)
    expm1 = _wrap(torch.expm1)
    log = _wrap(torch.log)
    log1p = _wrap(torch.log1p)
    log2 = _wrap(torch.log2)
    sqrt = _wrap(torch.sqrt)
    rsqrt = _wrap(torch.rsqrt)
    tanh = _wrap(torch.tanh)
    erf = _wrap(torch.erf)
    erfc = _wrap(torch.erfc)
    erfinv = _wrap(torch.erfinv)
    sin = _wrap(torch.sin)
    cos = _wrap(torch.cos)
    atan2 = _wrap(torch.atan2)
    hypot = _wrap(torch.hypot)
    pow = _wrap(torch.pow)
    fmod = _wrap(torch.fmod)
    floor = _wrap(torch.floor)
    ceil = _wrap(torch.ceil)
    trunc = _wrap(torch.trunc)
    rint = _wrap(torch.round)
    div_rn = _wrap(torch.div)

    round_bf16 = _wrap(lambda t: t.to(torch.bfloat16).to(torch.float32))
