"""KernelSpec -> Triton source text.

One program instance handles XBLOCK consecutive iterations of the flat
variable `x`. Every scalar primitive of `kitsune.ir.scalar` is rendered by
its entry in `kitsune.codegen.triton.ops.TRITON_OPS`; float16/bfloat16 values
live in float32 registers (the numerics contract) and are rounded only by
`cast` and by the final store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kitsune.codegen.kernel import KernelError, KernelSpec, reaches_only_low_precision
from kitsune.codegen.schedule import ReductionSchedule, opmath_dtype, outer_layout
from kitsune.tuning.launch import LaunchChoices, launch_choices
from kitsune.ir.index import Index, render, render_in_kernel
from kitsune.ir.scalar import Value
from kitsune.sizes import hint, is_symbolic, size_text

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


def emit_triton(spec: KernelSpec, fn_name: str, choices: LaunchChoices | None = None) -> str:
    """Source of a module defining the @triton.jit kernel `fn_name` (and for a
    split reduction `fn_name`_finish), laid out by `choices` (default: the
    current `launch_choices()`)."""
    if spec.reduction:
        return _emit_reduction(spec, fn_name, choices or launch_choices())
    wide = spec.wide_index()
    names, body = pointwise_body(spec)
    for out in spec.outputs:
        value = names[out.value]
        if not _is_block(out.value):
            value = f"tl.broadcast_to({value}, [XBLOCK])"
        if out.value.dtype != out.dtype:
            raise KernelError(f"{spec.name}: output {out.name} stores {out.value.dtype} into {out.dtype}")
        if out.dtype == torch.bfloat16:
            value = f"round_bf16({value})"
        body.append(f"tl.store({_pointer(out, 'x')}, {value}.to({TL_DTYPE[out.dtype]}), xmask)")
    params = ", ".join([i.name for i in spec.inputs] + [o.name for o in spec.outputs] + ["numel", *spec.sizes])
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
    return _with_checks("\n".join(lines) + "\n")


def pointwise_body(spec: KernelSpec, given: dict[Value, str] | None = None, mask: str | None = "xmask",
                   rows: int | None = None) -> tuple[dict[Value, str], list[str]]:
    """({value: name}, lines) computing every value the outputs of a pointwise
    spec need, at the flat index `x` (GELU's decomposition as `gelu_erf`).
    `given`: values already computed, by the text that stands for them (a
    fused matmul's accumulator for the load of its product); `mask`, `rows`:
    as for `_expr` (a 2-d tile renders with rows = its width, `row` and `r` in scope)."""
    names: dict[Value, str] = {}
    inputs = [i.name for i in spec.inputs]
    body: list[str] = []
    given = given or {}
    sums = one_plus_erf_sums(spec)
    gelus = gelu_products(spec, sums)
    live = _live(spec, {**sums, **gelus})
    for v in spec.values():
        if v not in live:
            continue
        names[v] = f"v{len(names)}"
        if v in given:
            text = given[v]
        elif v in gelus:
            text = f"gelu_erf({names[gelus[v]]})"
        elif v in sums:
            text = f"one_plus_erf({names[sums[v]]})"
        else:
            text = _expr(v, names, inputs, mask=mask, rows=rows)
        body.append(f"{names[v]} = {text}")
    return names, body


def _with_checks(source: str) -> str:
    """The module imports `check_index` where a kernel checks positions."""
    if "check_index(" not in source:
        return source
    return source.replace("from kitsune.codegen.triton.libm import ",
                          "from kitsune.codegen.triton.libm import check_index, ", 1)


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
    if v.op == "load_where" and not v.attr[1].is_const:
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
    if cdt == torch.bool:  # max of bools is any, min is all
        return literal(kind == "min", dtype)
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


# -- launch layout of reduction kernels ------------------------------------------
#
# The block sizes, warps and split decisions below read their thresholds from
# `kitsune.tuning.launch.LaunchChoices` (where the measurements behind each
# are recorded). `TritonKernel` computes its grid from the same functions.


def element_ops(spec: KernelSpec) -> int:
    """Operations a row kernel does per element (loads, arithmetic, casts):
    the values that vary along the row."""
    row = ReductionSchedule.of(spec).row
    return sum(1 for v in spec.values() if v not in row and v.op not in ("const", "index"))


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_plan(spec: KernelSpec, choices: LaunchChoices | None = None) -> tuple[int, int, int, int, int] | None:
    """(XBLOCK, RBLOCK, num_warps, SPLIT, CHUNK) when the kernel's reduction is
    split over SPLIT programs of CHUNK reduced elements each, else None.
    Split: outer layouts of at least `split_min_elements` (column sums) and row
    layouts of fewer rows than `split_rows` and more than
    `row_split_min_elements` (a whole-tensor sum is one row: SPLIT programs
    share it instead of one walking it all), when `splittable`."""
    c = choices or launch_choices()
    R, rows = spec.reduction, spec.rows
    if not R or spec.sizes:  # the parts and their workspace are sized at generation time
        return None
    if outer_layout(spec):
        if R * rows < c.split_min_elements or not splittable(spec):
            return None
        xblock = min(c.split_xblock, pow2(rows))
        rblock, most, warps = min(max(32, c.outer_tile // xblock), pow2(R)), c.split_max, c.split_warps
        programs = c.split_min_programs
    elif rows < c.split_rows and R * rows > c.row_split_min_elements and splittable(spec):
        xblock, rblock, most, warps = 1, min(c.looped_rblock, pow2(R)), c.row_split_max, c.looped_warps
        programs = c.row_split_programs
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
    schedule = ReductionSchedule.of(spec)
    if not schedule.reductions or schedule.max_stage != 1:
        return False
    if any(v.attr not in ("sum", "max", "min") or opmath_dtype(v.dtype) != torch.float32
           for v in schedule.reductions):
        return False  # the workspace holds float32 partials
    return not any(schedule.stage[o.value] != 0 for o in schedule.full_outputs)


def unsplit_few_rows(spec: KernelSpec, choices: LaunchChoices | None = None) -> str | None:
    """Why a reduction over few long rows is not generated (it would walk each
    row in one program: a whole-tensor variance of 16M elements on one SM),
    or None. The Triton backend's `refusal` (codegen/backends.py)."""
    c = choices or launch_choices()
    if spec.reduction and hint(spec.rows) < c.few_rows and hint(spec.numel) > c.few_rows_elements \
            and split_plan(spec, c) is None:
        return (f"{spec.rows} row(s) of {spec.reduction} elements and the reduction cannot be split "
                f"(several stages, or a per-element output needs it)")
    return None


def _warps_for(work: int) -> int:
    """Warps for a block of `work` elements."""
    return 8 if work >= 4096 else 4 if work >= 1024 else 2 if work >= 256 else 1


def reduction_blocks(spec: KernelSpec, choices: LaunchChoices | None = None) -> tuple[int, int, int, bool]:
    """(XBLOCK, RBLOCK, num_warps, persistent) for an unsplit reduction kernel.
    Symbolic sizes: blocks for the sizes seen, and a row of symbolic length is
    walked in chunks (a persistent block must hold the whole row)."""
    c = choices or launch_choices()
    R, rows = hint(spec.reduction), hint(spec.rows)
    fixed_row = not is_symbolic(spec.reduction)
    rblock = 1 << max(R - 1, 0).bit_length()
    if outer_layout(spec):
        xblock = 128
        while xblock > 16 and -(-rows // xblock) < c.outer_programs:
            xblock //= 2
        xblock = min(xblock, 1 << max(rows - 1, 0).bit_length())
        step = min(rblock, max(32, c.outer_tile // xblock), c.persistent_max)
        num_warps = c.outer_warps or _warps_for(xblock * step)
        return xblock, step, num_warps, step >= rblock and fixed_row
    persistent = rblock <= c.persistent_max and fixed_row
    if not persistent:
        rblock = min(rblock, c.looped_rblock, c.persistent_max)
    xblock = max(1, min(c.row_block_elements // rblock, 1 << max(rows - 1, 0).bit_length(), 64))
    num_warps = _warps_for(xblock * rblock)
    if not persistent:
        num_warps = min(num_warps, c.looped_warps)
    elif num_warps == 8 and element_ops(spec) > c.heavy_element_ops:
        num_warps = 4
    return xblock, rblock, num_warps, persistent


@dataclass(frozen=True)
class ReductionLayout:
    """How a reduction kernel is laid out over programs: XBLOCK rows a
    program, RBLOCK elements a step, its warps, whether a row fits one block,
    and for a split kernel the number of parts and their length."""

    xblock: int
    rblock: int
    num_warps: int
    persistent: bool
    split: int | None = None
    part_len: int | None = None

    @staticmethod
    def of(spec: KernelSpec, choices: LaunchChoices | None = None) -> "ReductionLayout":
        c = choices or launch_choices()
        plan = split_plan(spec, c)
        if plan:
            xblock, rblock, num_warps, split, part_len = plan
            return ReductionLayout(xblock, rblock, num_warps, False, split, part_len)
        return ReductionLayout(*reduction_blocks(spec, c))


def _emit_reduction(spec: KernelSpec, fn_name: str, choices: LaunchChoices) -> str:
    return _ReductionEmitter(spec, choices).source(fn_name)


class _ReductionEmitter:
    """Generates one reduction kernel (and a split kernel's finish kernel).

    `emit` names a Value in a scope, emitting the lines it needs first; the
    other methods emit one phase of the kernel each, in order: row values of
    stage 0, each reduction stage (in registers, or as loops over the row's
    chunks with accumulators), a split kernel's partial results and finish,
    the stores, and the function header."""

    def __init__(self, spec: KernelSpec, choices: LaunchChoices):
        self.spec, self.choices = spec, choices
        self.R, self.rows = spec.reduction, spec.rows
        self.schedule = ReductionSchedule.of(spec)
        self.layout = ReductionLayout.of(spec, choices)
        self.inputs = [i.name for i in spec.inputs]
        self.names: dict[Value, str] = {}
        self.counter = iter(range(10**9))
        self.body: list[str] = []
        self.finish_lines: list[str] = []  # the finish kernel's body (split kernels)
        self.along_row = Index.var().mod(self.R)
        self.sums = one_plus_erf_sums(spec)
        self.gelus = gelu_products(spec, self.sums)
        persistent = self.layout.persistent
        self.online = {} if persistent else _online_softmax_sums(self.schedule.reductions, self.schedule.row)
        # a looped kernel stores the per-element outputs that need no reduction in
        # its first pass (a gradient written next to its bias gradient is read,
        # computed and written once)
        self.early = [] if persistent else list(self.schedule.early_outputs)
        late = self.schedule.full_outputs if persistent else self.schedule.late_outputs
        self.full_outputs, self.row_outputs = list(late), list(self.schedule.row_outputs)
        # Masks only where the shape needs them: rows that fill the last program
        # need no row mask, and a looped row is walked in full chunks without a
        # mask, then in its last, partial chunk with one (the compare, the and and
        # the select per element were a tenth of a cross-entropy's instructions).
        self.row_mask = "rowmask" if self.rows % self.layout.xblock else None
        self.xmask = None  # the per-element mask of the code being emitted; read by emit()

    def fresh(self, prefix: str = "v") -> str:
        return f"{prefix}{next(self.counter)}"

    def emit(self, v: Value, scope: dict, out: list, indent: str) -> str:
        """Name of v in `scope`, emitting it (and what it needs) first."""
        if v in scope:
            return scope[v]
        if v.op == "reduce":
            raise KernelError(f"{self.spec.name}: reduction used before it is computed")
        position = v.op == "cast" and v.args[0].op == "index" and v.args[0].attr == self.along_row
        if position and v.dtype == torch.int32:
            text = "r"  # the position along the row is the loop's own int32 offset
        elif v in self.gelus:
            text = f"gelu_erf({self.emit(self.gelus[v], scope, out, indent)})"
        elif v in self.sums:
            text = f"one_plus_erf({self.emit(self.sums[v], scope, out, indent)})"
        else:
            for a in v.args:
                self.emit(a, scope, out, indent)
            is_row = v in self.schedule.row
            text = _expr(v, scope, self.inputs, var="xrow" if is_row else "x",
                         mask=self.row_mask if is_row else self.xmask, rows=self.R)
        name = self.fresh()
        out.append(f"{indent}{name} = {text}")
        scope[v] = name
        return name

    def set_mask(self, mask: str | None, indent: str) -> list[str]:
        """The line defining xmask (none without a mask); emit() reads it from here on."""
        self.xmask = None if mask is None else "xmask"
        return [] if mask is None else [f"{indent}xmask = {mask}"]

    def chunk_loops(self):
        """The header lines of each loop over the row's chunks (emit() then sees its mask)."""
        R, rblock, part_len = self.R, self.layout.rblock, self.layout.part_len
        if is_symbolic(R):  # a row of any length: chunks, each masked
            loops = [(f"0, {size_text(R)}", _and(self.row_mask, f"(r < {size_text(R)})"), "")]
        elif self.layout.split:  # this program's part of the row: CHUNK elements from part * CHUNK
            loops = [(f"part * {part_len}, part * {part_len} + {part_len}",
                      _and(self.row_mask, f"(r < {R})" if R % part_len else None), "")]
        else:
            full = R - R % rblock
            loops = [(f"0, {full}", self.row_mask, "")]
            if full < R:
                loops.append((f"{full}, {R}", _and(self.row_mask, f"(r < {R})"), "  # the last, partial chunk"))
        for bounds, mask, comment in loops:
            header = [f"for r0 in range({bounds}, RBLOCK):{comment}",
                      "    r = r0 + tl.arange(0, RBLOCK)[None, :]", "    x = xrow + r"]
            yield header + self.set_mask(mask, "    ")

    def row_scope(self) -> dict:
        """The names of the row values computed so far (what a chunk loop may reuse)."""
        return {k: n for k, n in self.names.items() if k in self.schedule.row}

    def row_stage(self, s: int) -> None:
        for v in self.schedule.row_stage_values(s):
            self.emit(v, self.names, self.body, "")

    # -- the kernel's phases ----------------------------------------------------

    def source(self, fn_name: str) -> str:
        """The module defining kernel `fn_name` (and a split kernel's finish)."""
        self.row_stage(0)
        if self.layout.persistent:
            self.body += ["r = tl.arange(0, RBLOCK)[None, :]", "x = xrow + r"]
            self.body += self.set_mask(_and(self.row_mask, f"(r < {self.R})" if self.R < self.layout.rblock
                                            else None), "")
        for s in range(self.schedule.max_stage):
            targets = self.schedule.reductions_of_stage(s + 1)
            if self.layout.persistent:
                self.persistent_stage(targets)
            else:
                self.looped_stage(s, [v for v in targets if v not in self.names])  # online sums are done already
            if self.layout.split:
                break  # the partial results are stored below; the finish kernel does the rest
            self.row_stage(s + 1)
        if self.layout.split:
            self.split_partials()
        self.store_outputs()
        return self.module(fn_name)

    def persistent_stage(self, targets: list) -> None:
        """A stage's reductions of a row held in one block."""
        for v in targets:
            arg = self.emit(v.args[0], self.names, self.body, "")
            block = _masked(self.xmask, arg, _identity(v.attr, v.dtype))
            name = self.fresh()
            self.body.append(f"{name} = {_finish(v.attr, block)}")
            self.names[v] = name

    def looped_stage(self, s: int, targets: list) -> None:
        """A stage's reductions as accumulators over the row's chunks."""
        if not targets:
            return
        pairs = [(m, total) for total, m in self.online.items() if m in targets]
        paired = dict(pairs)
        accs = self.init_accumulators(targets, pairs)
        steps = self.layout.part_len or self.R
        compensated = [v for v in targets if v.attr == "sum" and v.dtype == torch.float32 and v not in paired
                       and (is_symbolic(steps) or steps > self.choices.compensate_steps * self.layout.rblock)]
        for v in compensated:
            self.body.append(f"{accs[v]}_c = tl.zeros([XBLOCK, RBLOCK], tl.float32)")
            self.body.append(f"{accs[v]}_plain = tl.zeros([XBLOCK, RBLOCK], tl.float32)")
        for header in self.chunk_loops():
            self.body += header
            scope = self.row_scope()
            for v in targets:
                arg = self.emit(v.args[0], scope, self.body, "    ")
                block = _masked(self.xmask, arg, _identity(v.attr, v.dtype))
                if v in paired:
                    self.body += self.online_step(accs[v], accs[paired[v]], block)
                elif v in compensated:
                    self.body += self.compensated_step(accs[v], block)
                else:
                    self.body.append(f"    {accs[v]} = {_combine(v.attr, accs[v], block)}")
            for out in self.early if s == 0 else ():
                value = self.emit(out.value, scope, self.body, "    ")
                self.body.append("    " + _store(out, value, "x", self.xmask, "[XBLOCK, RBLOCK]", self.R))
        self.finish_accumulators(targets, accs, paired, compensated)
        for _, total in pairs:
            self.names[total] = accs[total]

    def init_accumulators(self, targets: list, pairs: list) -> dict:
        """{reduction: accumulator name}, each declared at its identity."""
        accs = {}
        paired = dict(pairs)
        for v in targets:
            accs[v] = self.fresh("acc")
            width = "1" if v in paired else "RBLOCK"  # online maxima are kept per row
            self.body.append(f"{accs[v]} = tl.full([XBLOCK, {width}], {_identity(v.attr, v.dtype)}, "
                             f"{TL_DTYPE[opmath_dtype(v.dtype)]})")
        for _, total in pairs:
            accs[total] = self.fresh("acc")
            self.body.append(f"{accs[total]} = tl.zeros([XBLOCK, 1], tl.float32)")
        return accs

    def online_step(self, maximum: str, total: str, block: str) -> list[str]:
        """online softmax: the row's running maximum grows chunk by chunk and
        the running sum is rescaled to it (one exp per element)"""
        m_new, chunk = self.fresh("m"), self.fresh("c")
        return [f"    {chunk} = {block}",
                f"    {m_new} = max_nan({maximum}, {_finish('max', chunk)})",
                f"    {total} = {total} * online_scale({maximum}, {m_new}) + "
                f"tl.sum(online_scale({chunk}, {m_new}), 1)[:, None]",
                f"    {maximum} = {m_new}"]

    def compensated_step(self, acc: str, block: str) -> list[str]:
        """Kahan-compensated: an outer kernel adds R / RBLOCK values to each
        lane in order (16384 floats erred 3.6 times as much as eager); the
        plain sum is kept for inf/NaN"""
        blk, y, t = self.fresh("b"), self.fresh("y"), self.fresh("t")
        return [f"    {blk} = {block}", f"    {acc}_plain = {acc}_plain + {blk}",
                f"    {y} = {blk} - {acc}_c", f"    {t} = {acc} + {y}",
                f"    {acc}_c = ({t} - {acc}) - {y}", f"    {acc} = {t}"]

    def finish_accumulators(self, targets: list, accs: dict, paired: dict, compensated: list) -> None:
        """Each reduction's row value from its accumulator."""
        for v in targets:
            if v in paired:
                self.names[v] = accs[v]
                continue
            name = self.fresh()
            if v in compensated:
                acc = accs[v]
                self.body += [f"{acc}_total = tl.sum({acc}_plain, 1)[:, None]",
                              f"{name} = tl.where({acc}_total - {acc}_total == 0, "
                              f"tl.sum({acc} - {acc}_c, 1)[:, None], {acc}_total)"]
            else:
                self.body.append(f"{name} = {_finish(v.attr, accs[v])}")
            self.names[v] = name

    def split_partials(self) -> None:
        """Partial results to the workspace; the finish kernel combines them per
        position and stores the row outputs."""
        split, rows, row_mask = self.layout.split, self.rows, self.row_mask
        reduced = self.schedule.reductions_of_stage(1)
        for k, v in enumerate(reduced):
            self.body.append(f"tl.store({_workspace_at(k, split, rows)}, {self.names[v]}"
                             + ("" if row_mask is None else f", {row_mask}") + ")")
        finish, finish_names = self.finish_lines, {}
        finish.append("part = tl.arange(0, SPLIT_BLOCK)[None, :]")
        for k, v in enumerate(reduced):
            mask = _and(row_mask, f"(part < {split})" if pow2(split) != split else None)
            load = f"tl.load({_workspace_at(k, split, rows)}" + (
                f", {mask}, other={_identity(v.attr, v.dtype)})" if mask else ")")
            name = self.fresh()
            finish.append(f"{name} = {_finish(v.attr, load)}")
            finish_names[v] = name
        for out in self.row_outputs:
            value = self.emit(out.value, finish_names, finish, "")
            finish.append(_store(out, value, "xrow", row_mask, "[XBLOCK, 1]", self.R))
        self.full_outputs, self.row_outputs = [], []

    def store_outputs(self) -> None:
        """The per-element outputs (in the block, or in a last pass over the
        chunks), then the row outputs."""
        if self.full_outputs and self.layout.persistent:
            for out in self.full_outputs:
                value = self.emit(out.value, self.names, self.body, "")
                self.body.append(_store(out, value, "x", self.xmask, "[XBLOCK, RBLOCK]", self.R))
        elif self.full_outputs:
            for header in self.chunk_loops():
                self.body += header
                scope = self.row_scope()
                for out in self.full_outputs:
                    value = self.emit(out.value, scope, self.body, "    ")
                    self.body.append("    " + _store(out, value, "x", self.xmask, "[XBLOCK, RBLOCK]", self.R))
        for out in self.row_outputs:
            value = self.emit(out.value, self.names, self.body, "")
            self.body.append(_store(out, value, "xrow", self.row_mask, "[XBLOCK, 1]", self.R))

    def module(self, fn_name: str) -> str:
        """The module: imports, the kernel's signature and row setup, its body,
        and a split kernel's finish kernel."""
        spec, R, rows, layout = self.spec, self.R, self.rows, self.layout
        split = layout.split
        wide = spec.wide_index()
        params = ", ".join(self.inputs + [o.name for o in spec.outputs] + (["ws"] if split else [])
                           + ["numel", *spec.sizes])
        pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
        comment = "\n".join(f"# {line}" for line in (spec.description or spec.name).splitlines())
        rows_of_program = [f"    row = ({pid} * XBLOCK + tl.arange(0, XBLOCK))[:, None]",
                           *([f"    rowmask = row < {size_text(rows)}"] if self.row_mask else []),
                           f"    xrow = row * {size_text(R)}"]
        start, tail = rows_of_program, []
        if split:
            start = rows_of_program + ["    part = tl.program_id(1)"]
            tail = ["",
                    f"# the {split} partial results of each position combined, and what follows from them",
                    "@triton.jit",
                    f"def {fn_name}_finish({params}, XBLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr):",
                    *rows_of_program, *[f"    {line}" for line in self.finish_lines]]
        lines = [
            "import triton",
            "import triton.language as tl",
            "from kitsune.codegen.triton.libm import gelu_erf, libm, one_plus_erf, round_bf16, max_nan, min_nan, "
            "mul_combine, online_scale",
            "",
            comment,
            f"# {rows} rows x {R} reduced elements; XBLOCK={layout.xblock} RBLOCK={layout.rblock} "
            f"num_warps={layout.num_warps} "
            f"{'persistent' if layout.persistent else 'looped'}{', outer layout' if self.schedule.outer else ''}"
            f"{f', split in {split} parts of {layout.part_len}' if split else ''}",
            "@triton.jit",
            f"def {fn_name}({params}, XBLOCK: tl.constexpr, RBLOCK: tl.constexpr):",
            *start,
        ]
        lines += [f"    {line}" for line in self.body] + tail
        return _with_checks("\n".join(lines) + "\n")


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
