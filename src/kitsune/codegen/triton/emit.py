"""KernelSpec -> Triton source text.

One program instance handles XBLOCK consecutive iterations of the flat
variable `x`. Every scalar primitive of `kitsune.ir.scalar` is rendered by
its entry in `kitsune.codegen.triton.ops.TRITON_OPS`; float16/bfloat16 values
live in float32 registers (the numerics contract) and are rounded only by
`cast` and by the final store.
"""
from __future__ import annotations

import math

import torch

from kitsune.codegen.kernel import (KernelError, KernelSpec, is_row_index, outer_layout, reaches_only_low_precision,
                                    reduction_stage, row_values)
from kitsune.ir.index import Index, render, render_in_kernel
from kitsune.ir.scalar import Value

# the primitive table, and the dtype helpers the kernel emitters use too
from kitsune.codegen.triton.ops import TL_DTYPE, TRITON_OPS, Context, compute_dtype, literal


def one_plus_erf_sums(spec: KernelSpec) -> dict[Value, Value]:
    """{1 + erf(z): z} for the float32 sums emitted as `one_plus_erf(z)` (GELU's
    cumulative distribution): those whose result reaches only bfloat16/float16
    outputs through products, where its 2^-17.8 relative error is invisible."""
    found = {}
    for v in spec.values():
        if v.op != "add" or compute_dtype(v.dtype) != torch.float32:
            continue
        for e, c in (v.args, v.args[::-1]):
            if (e.op == "erf" and c.op == "const" and c.attr == 1.0 and e.dtype == v.dtype
                    and reaches_only_low_precision(spec, v)):
                found[v] = e.args[0]
                break
    return found


def _scaled(v: Value, factor: float) -> Value | None:
    """y where v is y * factor (a constant), else None."""
    if v.op != "mul":
        return None
    for y, c in (v.args, v.args[::-1]):
        if c.op == "const" and isinstance(c.attr, float) and abs(c.attr - factor) < 1e-12:
            return y
    return None


def gelu_products(spec: KernelSpec, sums: dict[Value, Value]) -> dict[Value, Value]:
    """{(y * 0.5) * (1 + erf(y * sqrt(1/2))): y}, GELU's decomposition, for the
    products whose sum is emitted as `one_plus_erf`: emitted as `gelu_erf(y)`."""
    found = {}
    for v in spec.values():
        if v.op != "mul":
            continue
        for half, cdf in (v.args, v.args[::-1]):
            y = _scaled(half, 0.5)
            if cdf in sums and y is not None and _scaled(sums[cdf], 0.7071067811865476) == y:
                found[v] = y
                break
    return found


def _live(spec: KernelSpec, replaced: dict[Value, Value]) -> set:
    """The values the outputs need when each value in `replaced` is computed
    from its mapped value alone."""
    live, stack = set(), [o.value for o in spec.outputs]
    while stack:
        v = stack.pop()
        if v not in live:
            live.add(v)
            stack.extend((replaced[v],) if v in replaced else v.args)
    return live


def emit_triton(spec: KernelSpec, fn_name: str, persistent_max: int = 4096) -> str:
    """Source of a module defining the @triton.jit kernel `fn_name`."""
    if spec.reduction:
        return _emit_reduction(spec, fn_name, persistent_max)
    wide = spec.max_offset() >= 2**31 - 2**16
    names: dict[Value, str] = {}
    inputs = [i.name for i in spec.inputs]
    body: list[str] = []
    sums = one_plus_erf_sums(spec)
    gelus = gelu_products(spec, sums)
    live = _live(spec, {**sums, **gelus})
    for v in spec.values():
        if v not in live:
            continue
        names[v] = f"v{len(names)}"
        if v in gelus:
            text = f"gelu_erf({names[gelus[v]]})"
        elif v in sums:
            text = f"one_plus_erf({names[sums[v]]})"
        else:
            text = _expr(v, names, inputs)
        body.append(f"{names[v]} = {text}")
    for out in spec.outputs:
        value = names[out.value]
        if not _is_block(out.value):
            value = f"tl.broadcast_to({value}, [XBLOCK])"
        if out.value.dtype != out.dtype:
            raise KernelError(f"{spec.name}: output {out.name} stores {out.value.dtype} into {out.dtype}")
        if out.dtype == torch.bfloat16:
            value = f"round_bf16({value})"
        body.append(f"tl.store({_pointer(out, 'x')}, {value}.to({TL_DTYPE[out.dtype]}), xmask)")
    params = ", ".join([i.name for i in spec.inputs] + [o.name for o in spec.outputs] + ["numel"])
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    header = "\n".join(f"# {line}" for line in (spec.description or spec.name).splitlines())
    lines = [
        "import triton",
        "import triton.language as tl",
        "from kitsune.codegen.triton.libm import gelu_erf, libm, one_plus_erf, round_bf16",
        "",
        header,
        "@triton.jit",
        f"def {fn_name}({params}, XBLOCK: tl.constexpr):",
        f"    x = {pid} * XBLOCK + tl.arange(0, XBLOCK)",
        "    xmask = x < numel",
    ]
    lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"


def _and(*masks: str | None) -> str | None:
    """The conjunction of the masks that exist (None: nothing to mask)."""
    present = [m for m in masks if m is not None]
    return " & ".join(present) if present else None


def _masked(mask: str | None, value: str, identity: str) -> str:
    """A reduction's operand as a whole [XBLOCK, RBLOCK] block (a row value, or a
    mask of one per row, would otherwise be summed once instead of R times),
    `identity` where the mask is off."""
    block = f"tl.broadcast_to({value}, [XBLOCK, RBLOCK])"
    return block if mask is None else f"tl.where({mask}, {block}, {identity})"


def _is_block(v: Value) -> bool:
    """Whether v varies with x (otherwise it is a scalar in the kernel)."""
    if v.op == "load":
        return not v.attr[1].is_const
    if v.op == "load_at":
        return True
    if v.op == "index":
        return True
    return any(_is_block(a) for a in v.args)


def _render(index: Index, var: str, rows: int | None) -> str:
    """An index as text; in a row kernel (rows = R) digits of x within a row
    read r and digits above it read row: no division per element, and Triton
    sees which axis of the block is contiguous in memory."""
    return render_in_kernel(index, var, rows)


def _expr(v: Value, names: dict, inputs: list[str], var: str = "x", mask: str = "xmask",
          rows: int | None = None) -> str:
    """Triton text of v, its operands named by `names`: its primitive's entry
    in `TRITON_OPS`, rendered with `var` as the index variable, `mask` on its
    loads and `rows` the row length of a row kernel."""
    operands = [names[arg] for arg in v.args]
    renderer = TRITON_OPS.get(v.op)
    if renderer is None:
        raise KernelError(f"no Triton translation for primitive {v.op!r}")
    return renderer(v, operands, Context(inputs, var, mask, rows))


# -- reduction kernels --------------------------------------------------------
#
# One program handles XBLOCK rows. A row of R elements either fits in one
# [XBLOCK, RBLOCK] block ("persistent": every value is computed once, in
# registers) or is walked in RBLOCK chunks: one loop per reduction stage
# (reductions that depend on earlier reductions, like the variance on the
# mean, need the earlier result first), recomputing the elementwise values a
# loop needs from the loads, and a last loop for the per-element outputs.

_IDENTITY = {"sum": 0, "prod": 1, "any": 0, "all": 1}


def _identity(kind: str, dtype: torch.dtype) -> str:
    cdt = compute_dtype(dtype)
    if kind in _IDENTITY:
        return literal(_IDENTITY[kind], dtype)
    if cdt.is_floating_point:
        return literal(-math.inf if kind == "max" else math.inf, dtype)
    info = torch.iinfo(cdt)
    return literal(info.min if kind == "max" else info.max, dtype)


def _combine(kind: str, acc: str, v: str) -> str:
    return {"sum": f"{acc} + {v}", "prod": f"{acc} * {v}", "max": f"max_nan({acc}, {v})",
            "min": f"min_nan({acc}, {v})", "any": f"{acc} | {v}", "all": f"{acc} & {v}"}[kind]


def _finish(kind: str, block: str) -> str:
    if kind == "sum":
        return f"tl.sum({block}, 1)[:, None]"
    if kind in ("any", "all"):
        fn = "tl.max" if kind == "any" else "tl.min"
        return f"({fn}({block}.to(tl.int8), 1)[:, None] != 0)"
    fn = {"prod": "mul_combine", "max": "max_nan", "min": "min_nan"}[kind]
    return f"tl.reduce({block}, 1, {fn})[:, None]"


def _online_softmax_sums(reductions, row) -> dict:
    """{S: M} for sums S = sum(exp(A - M)) of a float32 A whose maximum is
    M = max(A): a looped kernel computes both in one pass over the row
    (online softmax: the running sum is rescaled whenever the maximum grows)
    instead of one pass for M and another for S."""
    maxima = {v.args[0]: v for v in reductions if v.attr == "max" and v.dtype == torch.float32}
    pairs = {}
    for v in reductions:
        if v.attr != "sum" or v.dtype != torch.float32 or v.args[0].op != "exp":
            continue
        diff = v.args[0].args[0]
        if diff.op != "sub" or diff.args[1].op != "reduce":
            continue
        a, m = diff.args
        if maxima.get(a) is m and a not in row:
            pairs[v] = m
    return pairs


# Outer (column) reductions: a program reduces RBLOCK positions of XBLOCK
# adjacent rows per step, so each load reads XBLOCK contiguous elements of one
# position; XBLOCK shrinks (down to 16) until there are enough programs to fill
# the GPU (a bias gradient has only as many rows as features), and RBLOCK
# grows so that a step holds OUTER_TILE elements: the loop is latency-bound
# (on an H200, a 16384x4096 bias gradient took 1.31 / 0.77 / 0.42 ms with
# 16 / 32 / 64 positions a step, whatever the number of programs).
OUTER_TILE = 8192
OUTER_PROGRAMS = 264
OUTER_WARPS = None  # None: by the step's size
# float32 sums whose lanes each add more than this many values are compensated
COMPENSATE_STEPS = 64
# Row kernels: a row longer than PERSISTENT_MAX is walked in chunks of
# LOOPED_RBLOCK with 4 warps (H200, 8192x32000 bf16 cross-entropy: 0.156 ms
# in chunks of 4096, 0.184 in chunks of 2048; 8 warps were slower in every
# chunk size). A persistent block of 4096 elements or more gets 8 warps,
# unless each element takes more than HEAVY_ELEMENT_OPS operations: then 4,
# which leaves each thread more independent work (16384x4096 bf16:
# softmax 0.072 ms with 8 warps, 0.079 with 4; layer_norm+GELU 0.083 with 4,
# 0.090 with 8; benchmarks/probe_rows.py and bench_reductions.py).
LOOPED_RBLOCK = 4096
LOOPED_WARPS = 4
# rows of fewer elements share a program, up to this many elements a block
ROW_BLOCK_ELEMENTS = 1024
HEAVY_ELEMENT_OPS = 12


def element_ops(spec: KernelSpec) -> int:
    """Operations a row kernel does per element (loads, arithmetic, casts):
    the values that vary along the row."""
    row = row_values(spec)
    return sum(1 for v in spec.values() if v not in row and v.op not in ("const", "index"))


# Split outer reductions: a column reduction over few output positions (a bias
# gradient: 4096 positions, 16384 tokens) reads SPLIT_XBLOCK adjacent
# positions of each row (128 contiguous bytes of bf16) and splits the reduced
# dimension over SPLIT programs, which write partial results to a float32
# workspace; a second, small kernel combines each position's partials and
# computes the epilogue. Unsplit, filling the GPU took tiles 16 positions wide:
# 32 bytes a row, half of each DRAM burst, and the kernel ran at 57 % of copy.
SPLIT_XBLOCK = 64
SPLIT_MIN_PROGRAMS = 528  # four programs per SM of an H100/H200
SPLIT_MIN_ELEMENTS = 1 << 20
SPLIT_MAX = 64
SPLIT_WARPS = 8
# Row layouts with fewer rows than this are split too (a whole-tensor sum is
# one row), into about ROW_SPLIT_PROGRAMS programs of LOOPED_RBLOCK-element
# chunks: many short programs balance over the SMs (H200, mean of (x - y)^2
# over 16384x4096 bf16: 512 / 1024 / 4096 parts 70 / 79 / 64 us, the last at
# the copy rate; benchmarks/probe_generated.py); unsplittable reductions of
# fewer than FEW_ROWS long rows run through PyTorch.
SPLIT_ROWS = 132
ROW_SPLIT_PROGRAMS = 4096
ROW_SPLIT_MAX = 4096
ROW_SPLIT_MIN_ELEMENTS = 1 << 16
FEW_ROWS, FEW_ROWS_ELEMENTS = 4, 1 << 16  # the planner's threshold for such reductions


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(spec: KernelSpec) -> tuple[int, int, int, int, int] | None:
    """(XBLOCK, RBLOCK, num_warps, SPLIT, CHUNK) when the kernel's reduction is
    split over SPLIT programs of CHUNK reduced elements each, else None.
    Split: outer layouts of at least SPLIT_MIN_ELEMENTS (column sums, see
    above) and row layouts of fewer rows than SPLIT_ROWS and more than
    ROW_SPLIT_MIN_ELEMENTS (a whole-tensor sum is one row: SPLIT programs share
    it instead of one walking it all), when `splittable`."""
    R, rows = spec.reduction, spec.rows
    if not R:
        return None
    if outer_layout(spec):
        if R * rows < SPLIT_MIN_ELEMENTS or not splittable(spec):
            return None
        xblock = min(SPLIT_XBLOCK, pow2(rows))
        rblock, most, warps = min(max(32, OUTER_TILE // xblock), pow2(R)), SPLIT_MAX, SPLIT_WARPS
        programs = SPLIT_MIN_PROGRAMS
    elif rows < SPLIT_ROWS and R * rows > ROW_SPLIT_MIN_ELEMENTS and splittable(spec):
        xblock, rblock, most, warps = 1, min(LOOPED_RBLOCK, pow2(R)), ROW_SPLIT_MAX, LOOPED_WARPS
        programs = ROW_SPLIT_PROGRAMS
    else:
        return None
    blocks = _cdiv(rows, xblock)
    split = 1
    while blocks * split < programs and split < most and R >= 2 * split * rblock:
        split *= 2
    chunk = _cdiv(_cdiv(R, split), rblock) * rblock  # whole RBLOCK steps a part
    split = _cdiv(R, chunk)  # no empty parts
    if split < 2:
        return None
    return xblock, rblock, warps, split, chunk


def split_workspace(spec: KernelSpec, split: int) -> int:
    """float32 elements between a split kernel's parts and its finish: one
    partial result per reduction, part and row (split kernels have one stage,
    so every reduction is partial)."""
    return split * spec.rows * sum(1 for v in spec.values() if v.op == "reduce")


def _workspace_at(k: int, split: int, rows: int) -> str:
    """Where reduction k's partial result of `part` for `row` lives in `ws`."""
    return f"ws + ({k * split} + part) * {rows} + row"


def splittable(spec: KernelSpec) -> bool:
    """One stage of sum/max/min reductions computed in float32 (float16 and
    bfloat16 included), and no per-element output that needs their result."""
    stage = reduction_stage(spec)
    reductions = [v for v in spec.values() if v.op == "reduce"]
    if not reductions or max(stage[v] for v in reductions) != 1:
        return False
    if any(v.attr not in ("sum", "max", "min") or compute_dtype(v.dtype) != torch.float32 for v in reductions):
        return False  # the workspace holds float32 partials
    row = row_values(spec)
    return not any(stage[o.value] != 0 and not (o.value in row and is_row_index(o.index, spec.reduction))
                   for o in spec.outputs)


def unsplit_few_rows(spec: KernelSpec) -> str | None:
    """Why a reduction over few long rows is not generated (it would walk each
    row in one program: a whole-tensor variance of 16M elements on one SM),
    or None."""
    if spec.reduction and spec.rows < FEW_ROWS and spec.numel > FEW_ROWS_ELEMENTS and split_plan(spec) is None:
        return (f"{spec.rows} row(s) of {spec.reduction} elements and the reduction cannot be split "
                f"(several stages, or a per-element output needs it)")
    return None


def reduction_blocks(spec: KernelSpec, persistent_max: int) -> tuple[int, int, int, bool]:
    """(XBLOCK, RBLOCK, num_warps, persistent) for a reduction kernel."""
    R, rows = spec.reduction, spec.rows
    rblock = 1 << max(R - 1, 0).bit_length()
    if outer_layout(spec):
        xblock = 128
        while xblock > 16 and -(-rows // xblock) < OUTER_PROGRAMS:
            xblock //= 2
        xblock = min(xblock, 1 << max(rows - 1, 0).bit_length())
        step = min(rblock, max(32, OUTER_TILE // xblock), persistent_max)
        work = xblock * step
        num_warps = OUTER_WARPS or (8 if work >= 4096 else 4 if work >= 1024 else 2 if work >= 256 else 1)
        return xblock, step, num_warps, step >= rblock
    persistent = rblock <= persistent_max
    if not persistent:
        rblock = min(rblock, LOOPED_RBLOCK, persistent_max)
    xblock = max(1, min(ROW_BLOCK_ELEMENTS // rblock, 1 << max(rows - 1, 0).bit_length(), 64))
    work = xblock * rblock
    num_warps = 8 if work >= 4096 else 4 if work >= 1024 else 2 if work >= 256 else 1
    if not persistent:
        num_warps = min(num_warps, LOOPED_WARPS)
    elif num_warps == 8 and element_ops(spec) > HEAVY_ELEMENT_OPS:
        num_warps = 4
    return xblock, rblock, num_warps, persistent


def _emit_reduction(spec: KernelSpec, fn_name: str, persistent_max: int) -> str:
    R, rows = spec.reduction, spec.rows
    wide = spec.max_offset() >= 2**31 - 2**16
    plan = split_plan(spec)
    if plan:
        xblock, rblock, num_warps, split, part_len = plan
        persistent = False
    else:
        xblock, rblock, num_warps, persistent = reduction_blocks(spec, persistent_max)
        split = part_len = None
    inputs = [i.name for i in spec.inputs]
    values = spec.values()
    row = row_values(spec)
    stage = reduction_stage(spec)
    names: dict[Value, str] = {}
    counter = iter(range(10**9))
    body: list[str] = []

    def emit(v: Value, scope: dict, out: list, indent: str) -> str:
        """Name of v in `scope`, emitting it (and what it needs) first."""
        if v in scope:
            return scope[v]
        if v.op == "reduce":
            raise KernelError(f"{spec.name}: reduction used before it is computed")
        position = v.op == "cast" and v.args[0].op == "index" and v.args[0].attr == along_row
        if position and v.dtype == torch.int32:
            text = "r"  # the position along the row is the loop's own int32 offset
        elif v in gelus:
            text = f"gelu_erf({emit(gelus[v], scope, out, indent)})"
        elif v in sums:
            text = f"one_plus_erf({emit(sums[v], scope, out, indent)})"
        else:
            for a in v.args:
                emit(a, scope, out, indent)
            is_row = v in row
            text = _expr(v, scope, inputs, var="xrow" if is_row else "x", mask=row_mask if is_row else masks["x"],
                         rows=R)
        name = f"v{next(counter)}"
        out.append(f"{indent}{name} = {text}")
        scope[v] = name
        return name

    along_row = Index.var().mod(R)
    sums = one_plus_erf_sums(spec)
    gelus = gelu_products(spec, sums)
    reductions = [v for v in values if v.op == "reduce"]
    max_stage = max((stage[v] for v in reductions), default=0)
    online = {} if persistent else _online_softmax_sums(reductions, row)
    # A row value stored at an index that walks the row too (a broadcast row
    # value written at full shape) is stored by the element loop.
    row_outputs = [o for o in spec.outputs if o.value in row and is_row_index(o.index, R)]
    full_outputs = [o for o in spec.outputs if o not in row_outputs]
    # a looped kernel stores the per-element outputs that need no reduction in
    # its first pass (a gradient written next to its bias gradient is read,
    # computed and written once)
    early = [o for o in full_outputs if stage[o.value] == 0] if max_stage and not persistent else []
    full_outputs = [o for o in full_outputs if o not in early]

    def row_stage_values(s):
        return [v for v in values if v in row and v.op != "reduce" and stage[v] == s]

    # Masks only where the shape needs them: rows that fill the last program
    # need no row mask, and a looped row is walked in full chunks without a
    # mask, then in its last, partial chunk with one (the compare, the and and
    # the select per element were a tenth of a cross-entropy's instructions).
    row_mask = "rowmask" if rows % xblock else None
    masks = {"x": None}  # the per-element mask of the code being emitted; read by emit()

    def set_mask(mask: str | None, indent: str) -> list[str]:
        """The line defining xmask (none without a mask); emit() reads it from here on."""
        masks["x"] = None if mask is None else "xmask"
        return [] if mask is None else [f"{indent}xmask = {mask}"]

    def chunk_loops():
        """The header lines of each loop over the row's chunks (emit() then sees its mask)."""
        if split:  # this program's part of the row: CHUNK elements from part * CHUNK
            loops = [(f"part * {part_len}, part * {part_len} + {part_len}",
                      _and(row_mask, f"(r < {R})" if R % part_len else None), "")]
        else:
            full = R - R % rblock
            loops = [(f"0, {full}", row_mask, "")]
            if full < R:
                loops.append((f"{full}, {R}", _and(row_mask, f"(r < {R})"), "  # the last, partial chunk"))
        for bounds, mask, comment in loops:
            header = [f"for r0 in range({bounds}, RBLOCK):{comment}",
                      "    r = r0 + tl.arange(0, RBLOCK)[None, :]", "    x = xrow + r"]
            yield header + set_mask(mask, "    ")

    for v in row_stage_values(0):
        emit(v, names, body, "")
    if persistent:
        body += ["r = tl.arange(0, RBLOCK)[None, :]", "x = xrow + r"]
        body += set_mask(_and(row_mask, f"(r < {R})" if R < rblock else None), "")
    for s in range(max_stage):
        targets = [v for v in reductions if stage[v] == s + 1]
        if persistent:
            for v in targets:
                arg = emit(v.args[0], names, body, "")
                block = _masked(masks["x"], arg, _identity(v.attr, v.dtype))
                name = f"v{next(counter)}"
                body.append(f"{name} = {_finish(v.attr, block)}")
                names[v] = name
        else:
            targets = [v for v in targets if v not in names]  # online sums are done already
            pairs = [(m, total) for total, m in online.items() if m in targets]
            if not targets:
                for v in row_stage_values(s + 1):
                    emit(v, names, body, "")
                continue
            accs = {}
            paired = {m: total for m, total in pairs}
            for v in targets:
                accs[v] = f"acc{next(counter)}"
                width = "1" if v in paired else "RBLOCK"  # online maxima are kept per row
                body.append(f"{accs[v]} = tl.full([XBLOCK, {width}], {_identity(v.attr, v.dtype)}, "
                            f"{TL_DTYPE[compute_dtype(v.dtype)]})")
            for _, total in pairs:
                accs[total] = f"acc{next(counter)}"
                body.append(f"{accs[total]} = tl.zeros([XBLOCK, 1], tl.float32)")
            compensated = {v for v in targets if v.attr == "sum" and v.dtype == torch.float32 and v not in paired
                           and (part_len or R) > COMPENSATE_STEPS * rblock}
            for v in compensated:
                body.append(f"{accs[v]}_c = tl.zeros([XBLOCK, RBLOCK], tl.float32)")
                body.append(f"{accs[v]}_plain = tl.zeros([XBLOCK, RBLOCK], tl.float32)")
            for header in chunk_loops():
                body += header
                scope = {k: n for k, n in names.items() if k in row}
                for v in targets:
                    arg = emit(v.args[0], scope, body, "    ")
                    block = _masked(masks["x"], arg, _identity(v.attr, v.dtype))
                    if v in paired:
                        # online softmax: the row's running maximum grows chunk by
                        # chunk and the running sum is rescaled to it (one exp per element)
                        m_new, chunk, total = f"m{next(counter)}", f"c{next(counter)}", accs[paired[v]]
                        body += [f"    {chunk} = {block}",
                                 f"    {m_new} = max_nan({accs[v]}, {_finish('max', chunk)})",
                                 f"    {total} = {total} * online_scale({accs[v]}, {m_new}) + "
                                 f"tl.sum(online_scale({chunk}, {m_new}), 1)[:, None]",
                                 f"    {accs[v]} = {m_new}"]
                    elif v in compensated:
                        # Kahan-compensated: an outer kernel adds R / RBLOCK values
                        # to each lane in order (16384 floats erred 3.6 times as much
                        # as eager); the plain sum is kept for inf/NaN
                        acc, blk, y, t = accs[v], f"b{next(counter)}", f"y{next(counter)}", f"t{next(counter)}"
                        body += [f"    {blk} = {block}", f"    {acc}_plain = {acc}_plain + {blk}",
                                 f"    {y} = {blk} - {acc}_c", f"    {t} = {acc} + {y}",
                                 f"    {acc}_c = ({t} - {acc}) - {y}", f"    {acc} = {t}"]
                    else:
                        body.append(f"    {accs[v]} = {_combine(v.attr, accs[v], block)}")
                for out in early if s == 0 else ():
                    value = emit(out.value, scope, body, "    ")
                    body.append("    " + _store(out, value, "x", masks["x"], "[XBLOCK, RBLOCK]", R))
            for v in targets:
                if v in paired:
                    names[v] = accs[v]
                    continue
                name = f"v{next(counter)}"
                if v in compensated:
                    acc = accs[v]
                    body += [f"{acc}_total = tl.sum({acc}_plain, 1)[:, None]",
                             f"{name} = tl.where({acc}_total - {acc}_total == 0, "
                             f"tl.sum({acc} - {acc}_c, 1)[:, None], {acc}_total)"]
                else:
                    body.append(f"{name} = {_finish(v.attr, accs[v])}")
                names[v] = name
            for m, total in pairs:
                names[total] = accs[total]
        if split:
            break  # the partial results are stored below; the finish kernel does the rest
        for v in row_stage_values(s + 1):
            emit(v, names, body, "")
    finish: list[str] = []
    if split:
        # partial results to the workspace; the finish kernel combines them per position
        reduced = [v for v in reductions if stage[v] == 1]
        for k, v in enumerate(reduced):
            body.append(f"tl.store({_workspace_at(k, split, rows)}, {names[v]}"
                        + ("" if row_mask is None else f", {row_mask}") + ")")
        finish_names: dict[Value, str] = {}
        split_block = pow2(split)
        finish.append("part = tl.arange(0, SPLIT_BLOCK)[None, :]")
        for k, v in enumerate(reduced):
            mask = _and(row_mask, f"(part < {split})" if split_block != split else None)
            load = f"tl.load({_workspace_at(k, split, rows)}" + (
                f", {mask}, other={_identity(v.attr, v.dtype)})" if mask else ")")
            name = f"v{next(counter)}"
            finish.append(f"{name} = {_finish(v.attr, load)}")
            finish_names[v] = name
        for out in row_outputs:
            value = emit(out.value, finish_names, finish, "")
            finish.append(_store(out, value, "xrow", row_mask, "[XBLOCK, 1]", R))
        full_outputs, row_outputs = [], []
    if full_outputs and persistent:
        for out in full_outputs:
            value = emit(out.value, names, body, "")
            body.append(_store(out, value, "x", masks["x"], "[XBLOCK, RBLOCK]", R))
    elif full_outputs:
        for header in chunk_loops():
            body += header
            scope = {k: n for k, n in names.items() if k in row}
            for out in full_outputs:
                value = emit(out.value, scope, body, "    ")
                body.append("    " + _store(out, value, "x", masks["x"], "[XBLOCK, RBLOCK]", R))
    for out in row_outputs:
        value = emit(out.value, names, body, "")
        body.append(_store(out, value, "xrow", row_mask, "[XBLOCK, 1]", R))

    params = ", ".join(inputs + [o.name for o in spec.outputs] + (["ws"] if split else []) + ["numel"])
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    header = "\n".join(f"# {line}" for line in (spec.description or spec.name).splitlines())
    rows_of_program = [f"    row = ({pid} * XBLOCK + tl.arange(0, XBLOCK))[:, None]",
                       *([f"    rowmask = row < {rows}"] if row_mask else []),
                       f"    xrow = row * {R}"]
    start, tail = rows_of_program, []
    if split:
        start = rows_of_program + ["    part = tl.program_id(1)"]
        tail = ["",
                f"# the {split} partial results of each position combined, and what follows from them",
                "@triton.jit",
                f"def {fn_name}_finish({params}, XBLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr):",
                *rows_of_program, *[f"    {line}" for line in finish]]
    lines = [
        "import triton",
        "import triton.language as tl",
        "from kitsune.codegen.triton.libm import gelu_erf, libm, one_plus_erf, round_bf16, max_nan, min_nan, "
        "mul_combine, online_scale",
        "",
        header,
        f"# {rows} rows x {R} reduced elements; XBLOCK={xblock} RBLOCK={rblock} num_warps={num_warps} "
        f"{'persistent' if persistent else 'looped'}{', outer layout' if outer_layout(spec) else ''}"
        f"{f', split in {split} parts of {part_len}' if split else ''}",
        "@triton.jit",
        f"def {fn_name}({params}, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr):",
        *start,
    ]
    lines += [f"    {line}" for line in body] + tail
    return "\n".join(lines) + "\n"


def _store(out, value: str, var: str, mask: str | None, shape: str, rows: int | None = None) -> str:
    if out.value.dtype != out.dtype:
        raise KernelError(f"output {out.name} stores {out.value.dtype} into {out.dtype}")
    value = f"tl.broadcast_to({value}, {shape})"
    if out.dtype == torch.bfloat16:
        value = f"round_bf16({value})"
    mask = "" if mask is None else f", {mask}"
    return f"tl.store({_pointer(out, var, rows)}, {value}.to({TL_DTYPE[out.dtype]}){mask})"


def _pointer(out, var: str, rows: int | None = None) -> str:
    """Block of pointers for a store (a constant offset still needs the block's shape)."""
    offset = _render(out.index, var, rows)
    return f"{out.name} + ({offset})" + (f" + 0 * {var}" if out.index.is_const else "")
