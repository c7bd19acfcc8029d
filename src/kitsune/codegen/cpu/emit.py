"""KernelSpec -> C source for the CPU backend.

Each kernel is one `parallel for simd` loop over the flat variable `x`:
OpenMP splits it across threads, and GCC vectorises the body, calling
glibc's vector math library (libmvec) for the transcendental functions that
`#pragma omp declare simd` marks (see `MATH_DECLS`). Built without
`-ffast-math`: NaN, Inf and signed zeros behave as IEEE and as eager does.

Numerics follow `kitsune.ir.scalar`: float16/bfloat16 computed in float,
integer arithmetic wraps (`-fwrapv`), integer division by zero sets an error
flag that the launcher turns into eager's "ZeroDivisionError".
"""
from __future__ import annotations

import math

import torch

from kitsune.codegen.kernel import KernelError, KernelSpec
from kitsune.codegen.schedule import ReductionSchedule, outer_layout
from kitsune.ir.index import divides_x_in_rows, render, render_in_kernel
from kitsune.ir.scalar import Value
from kitsune.sizes import as_size, divides, hint, is_symbolic, size_text
from kitsune.tuning.launch import LaunchChoices, launch_choices

# the primitive table, and the type maps and helpers the kernel emitters use too
from kitsune.codegen.cpu.ops import _LIBM, C_OPS, COMPUTE, STORAGE, Context, _f, literal


# Functions glibc's libmvec has vector variants of (x86_64, glibc >= 2.35), by
# arity. `kitsune.codegen.cpu.toolchain` probes which of them link here.
VECTOR_MATH = {
    "exp": 1, "exp2": 1, "expm1": 1, "log": 1, "log1p": 1, "log2": 1, "tanh": 1, "erf": 1, "erfc": 1,
    "sin": 1, "cos": 1, "atan2": 2, "hypot": 2, "pow": 2,
}

PRELUDE = r"""
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

static inline float kitsune_bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
/* Round to nearest even, NaN to the canonical quiet NaN (as c10::BFloat16). */
static inline uint16_t kitsune_f32_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? (uint16_t)0x7fc0u : (uint16_t)rounded;
}
static inline float kitsune_round_bf16(float f) { return kitsune_bf16_to_f32(kitsune_f32_to_bf16(f)); }

/* erfinv as eager PyTorch computes it: rational first guess, two Newton steps. */
#define KITSUNE_ERFINV(T, SUFFIX)                                                  \
static inline T kitsune_erfinv##SUFFIX(T y) {                                    \
  const T a0 = 0.886226899, a1 = -1.645349621, a2 = 0.914624893, a3 = -0.140543331; \
  const T b0 = -2.118377725, b1 = 1.442710462, b2 = -0.329097515, b3 = 0.012229801; \
  const T c0 = -1.970840454, c1 = -1.624906493, c2 = 3.429567803, c3 = 1.641345311; \
  const T d0 = 3.543889200, d1 = 1.637067800;                                     \
  const T y_abs = fabs##SUFFIX(y);                                                \
  if (y_abs > (T)1) return (T)NAN;                                                \
  if (y_abs == (T)1) return copysign##SUFFIX((T)INFINITY, y);                     \
  T x;                                                                            \
  if (y_abs <= (T)0.7) {                                                          \
    const T z = y * y;                                                            \
    const T num = (((a3 * z + a2) * z + a1) * z + a0);                            \
    const T dem = ((((b3 * z + b2) * z + b1) * z + b0) * z + (T)1);               \
    x = y * num / dem;                                                            \
  } else {                                                                        \
    const T z = sqrt##SUFFIX(-log##SUFFIX(((T)1 - y_abs) / (T)2));                \
    const T num = ((c3 * z + c2) * z + c1) * z + c0;                              \
    const T dem = (d1 * z + d0) * z + (T)1;                                       \
    x = copysign##SUFFIX(num, y) / dem;                                           \
  }                                                                               \
  const T two_over_sqrt_pi = (T)1.12837916709551257390;                           \
  x = x - (erf##SUFFIX(x) - y) / (two_over_sqrt_pi * exp##SUFFIX(-x * x));        \
  x = x - (erf##SUFFIX(x) - y) / (two_over_sqrt_pi * exp##SUFFIX(-x * x));        \
  return x;                                                                       \
}
KITSUNE_ERFINV(float, f)
KITSUNE_ERFINV(double, )
"""


# After the vector-math declarations (its expf then vectorises through libmvec).
FLOAT_ERF = r"""
/* erf of a float as eager PyTorch's vectorised CPU kernels compute it (its
   torch.erf and GELU on contiguous float tensors; at::vec's Vectorized<float>::erf):
   Abramowitz & Stegun 7.1.26, 1 - t * r(t) * exp(-x^2) with t = 1 / (1 + p |x|),
   |error| < 1.5e-7, one expf. glibc's vector erff took half of a GELU
   backward's time and left eager ahead on GELU.
   kitsune_erff_e takes that exp, e = expf(-(x * x)), from the caller: GELU's
   backward needs it for its pdf as well (see `_shared_exps`). */
static inline float kitsune_erff_e(float x, float e) {
  const float t = 1.0f / fmaf(0.3275911f, fabsf(x), 1.0f);
  float r = fmaf(1.061405429f, t, -1.453152027f);
  r = fmaf(r, t, 1.421413741f);
  r = fmaf(r, t, -0.284496736f);
  r = fmaf(r, t, 0.254829592f);
  return copysignf(fmaf(-e * t, r, 1.0f), x);
}
static inline float kitsune_erff(float x) { return kitsune_erff_e(x, expf(-(x * x))); }
"""


def math_declarations(names: dict[str, int]) -> str:
    """`declare simd` prototypes: GCC then calls libmvec's vector variants."""
    lines = []
    for name, arity in sorted(names.items()):
        for ctype, suffix in (("float", "f"), ("double", "")):
            params = ", ".join([ctype] * arity)
            lines.append("#pragma omp declare simd notinbranch")
            lines.append(f"extern {ctype} {name}{suffix}({params});")
    return "\n".join(lines)


def emit_kernel(spec: KernelSpec, fn_name: str, choices: LaunchChoices | None = None) -> str:
    """C source of `int fn_name(inputs..., outputs..., int64_t numel, int threads)`,
    laid out by `choices` (default: the current `launch_choices()`).

    Returns 0, or 1 when an integer division by zero happened."""
    choices = choices or launch_choices()
    if spec.reduction:
        if outer_layout(spec) and not few_rows(spec, choices):
            return _emit_outer_reduction(spec, fn_name, choices)
        return _emit_reduction(spec, fn_name, choices)
    inputs = [i.name for i in spec.inputs]
    values = spec.values()
    shared = _shared_exps(values)
    R = _inner_period(spec, values)
    names: dict[Value, str] = {}
    body: list[str] = []
    uses_err = False

    def emit(v: Value) -> None:
        nonlocal uses_err
        if v in names:
            return
        for a in _operands(v, shared):
            emit(a)
        names[v] = f"v{len(names)}"
        text = _expr(v, names, inputs, rows=R, shared=shared)
        uses_err |= "kitsune_err" in text
        body.append(f"const {COMPUTE[v.dtype]} {names[v]} = {text};")

    live = {out.value for out in spec.outputs}  # (a shared exp's own argument is not)
    for v in reversed(values):
        if v in live:
            live.update(_operands(v, shared))
    for v in values:
        if v in live:
            emit(v)
    for out in spec.outputs:
        if out.value.dtype != out.dtype:
            raise KernelError(f"{spec.name}: output {out.name} stores {out.value.dtype} into {out.dtype}")
        value = names[out.value]
        if out.dtype == torch.bfloat16:
            value = f"kitsune_f32_to_bf16({value})"
        elif out.dtype == torch.float16:
            value = f"(_Float16){value}"
        body.append(f"{out.name}[{_render(out.index, 'x', R)}] = {value};")
    params = [f"const {STORAGE[i.dtype]} *restrict {i.name}" for i in spec.inputs]
    params += [f"{STORAGE[o.dtype]} *restrict {o.name}" for o in spec.outputs]
    params += ["int64_t numel", *size_params(spec), "int threads"]
    reduction = " reduction(|:kitsune_err)" if uses_err else ""
    header = "\n".join(f"// {line}" for line in (spec.description or spec.name).splitlines())
    lines = [header, f"int {fn_name}({', '.join(params)}) {{", "  int kitsune_err = 0;"]
    parallel = f"#pragma omp parallel for{{}} schedule(static) num_threads(threads) " \
               f"if(numel >= {choices.cpu_parallel_threshold}){reduction}"
    if R is None:
        lines += ["  " + parallel.format(" simd"), "  for (int64_t x = 0; x < numel; ++x) {"]
        lines += [f"    {line}" for line in body]
        lines += ["  }"]
    else:
        rows, R_text = size_text(as_size(spec.numel // R)), size_text(R)
        lines += [f"  // rows of {R}: indices that repeat along a row (a bias) read r, per-row ones read row",
                  "  " + parallel.format(""), f"  for (int64_t row = 0; row < {rows}; ++row) {{",
                  f"    const int64_t xrow = row * {R_text};", f"    #pragma omp simd{reduction}",
                  f"    for (int64_t r = 0; r < {R_text}; ++r) {{", "      const int64_t x = xrow + r;"]
        lines += [f"      {line}" for line in body]
        lines += ["    }", "  }"]
    lines += ["  return kitsune_err;", "}", ""]
    return "\n".join(lines)


def _inner_period(spec: KernelSpec, values) -> int | None:
    """R when a pointwise kernel should run as rows of R elements (x = row * R + r):
    when every index digit that needs a division or a modulo of x (a bias read at
    x % 1024, a per-row scale at x / 1024) becomes a plain r or row, which
    `render_rows` then writes. The flat loop's `in1[x % 1024]` is a gather with an
    integer division per element in the vector loop (layer bias + GELU, 512x1024
    fp32: 269 -> 190 us). None: the flat loop (nothing to divide, or no such R)."""
    indices = [v.attr[1] for v in values if v.op in ("load", "load_where")] + \
        [v.attr for v in values if v.op == "index"]
    indices += [o.index for o in spec.outputs]
    periods = {t.div * t.mod if t.mod is not None else t.div for index in indices for t in index.terms
               if t.base is None and (t.mod is not None or t.div != 1)}
    for R in sorted(periods, key=hint, reverse=True):
        if hint(R) >= 8 and divides(R, spec.numel) and hint(spec.numel) // hint(R) >= 64 and \
                not any(divides_x_in_rows(index, R) for index in indices):
            return R
    return None


def _render(index, var: str, rows: int | None) -> str:
    """C text of an index; in a row kernel (rows = R) digits of x within a row
    read the loop's r and digits above it read row: no division per element."""
    return render_in_kernel(index, var, rows, floordiv="/")


def _expr(v: Value, names: dict, inputs: list[str], var: str = "x", rows: int | None = None,
          shared: dict | None = None) -> str:
    """C text of v, its operands named by `names`: its primitive's entry in
    `C_OPS`, with `var` as the index variable and `rows` the row length of a
    row loop; `shared`: `_shared_exps`."""
    if shared and v in shared:
        # the exp as kitsune_erff(z) computes it (shared[exp] = z); the erf given that exp
        if v.op == "exp":
            z = names[shared[v]]
            return f"expf(-({z} * {z}))"
        return f"kitsune_erff_e({names[v.args[0]]}, {names[shared[v]]})"
    operands = [names[arg] for arg in v.args]
    renderer = C_OPS.get(v.op)
    if renderer is None:
        raise KernelError(f"no C translation for primitive {v.op!r}")
    return renderer(v, operands, Context(inputs, var, rows))


# GELU's backward (PyTorch's decomposition of the erf form) computes per element
# cdf = (erf(a * M_SQRT1_2) + 1) * 0.5 and pdf = exp(a * a * -0.5) * (1/sqrt(2 pi)):
# the same exponential twice, since kitsune_erff(z) computes expf(-(z * z)).
_SQRT1_2 = 0.70710678118654752


def _as_float(value) -> float:
    """A constant as a float kernel sees it (`literal` rounds it to float); NaN
    for a symbolic size (equal to no constant)."""
    if is_symbolic(value):
        return float("nan")
    return torch.tensor(value, dtype=torch.float32).item()


def _times_const(v: Value, factor: float) -> Value | None:
    """a where v is a * c or c * a, c the constant `factor` as a float; else None."""
    if v.op == "mul":
        for c, a in (v.args, v.args[::-1]):
            if c.op == "const" and _as_float(c.attr) == _as_float(factor):
                return a
    return None


def _shared_exps(values) -> dict:
    """Which float exps reuse the one an erf computes: for each a with both
    erf(z), z = a * (1/sqrt 2), and exp(a * a * -0.5) among `values`, the exp
    maps to z and the erf to the exp (what each is computed from instead, or
    as well: `_operands`). The exp is then emitted as expf(-(z * z)) and the
    erf as kitsune_erff_e(z, exp): one expf per element, not two.

    Numerics: the erf is kitsune_erff(z) bit for bit. The exp's argument
    -(z * z) is eager's (a * a) * -0.5 but for the roundings of 1/sqrt 2, of
    z and of z * z: within ~5 * 2^-24 relative (4 ulps at most, measured), so
    the exp is within ~5 * 2^-24 * |argument| relative of eager's. In GELU's
    a * pdf (pdf = exp * 0.399) that is < 1e-7 absolute, times the incoming
    gradient (0.2 * max x^3 exp(-x^2 / 2) = 0.23). +-inf and NaN a give the
    exp eager does (0, NaN)."""
    erfs: dict = {}  # a -> erf(a * (1/sqrt 2))
    for v in values:
        if v.op == "erf" and COMPUTE[v.dtype] == "float":
            a = _times_const(v.args[0], _SQRT1_2)
            if a is not None:
                erfs.setdefault(a, v)
    shared: dict = {}
    for v in values:
        if v.op == "exp" and COMPUTE[v.dtype] == "float":
            square = _times_const(v.args[0], -0.5)
            if square is not None and square.op == "mul" and square.args[0] == square.args[1]:
                erf = erfs.pop(square.args[0], None)  # pop: one exp per erf
                if erf is not None:
                    shared[v], shared[erf] = erf.args[0], v
    return shared


def _operands(v: Value, shared: dict) -> tuple:
    """The Values v is computed from in C: its arguments, but z alone for an
    exp that `_shared_exps` shares, and its argument and that exp for the erf."""
    if v not in shared:
        return v.args
    return (shared[v],) if v.op == "exp" else v.args + (shared[v],)



# -- reduction kernels --------------------------------------------------------
#
# Threads split the rows; in each row one `omp simd` loop per reduction stage
# accumulates (the variance needs the mean first), recomputing the elementwise
# values it needs, and a last loop writes the per-element outputs. What that
# last loop would recompute at a cost (softmax's exp) the loop before it keeps
# in a row-long buffer on the thread's stack instead (`_kept_values`).

# primitives worth a store and a load per element rather than recomputing
COSTLY = (set(_LIBM) - {"floor", "ceil", "trunc", "round"}) | {"sigmoid", "rsqrt", "erfinv", "truediv"}


def _kept_values(outputs: list, available: dict, row: set, R: int, budget: int) -> list:
    """The per-element Values of the previous loop (`available`) that the
    final loop would have to recompute and that are costly to: the first ones
    the outputs reach that have a costly primitive among their per-element
    ancestors. Each costs R elements of stack: kept while `budget` bytes last
    (`LaunchChoices.cpu_row_buffer_bytes`)."""
    costly: dict = {}

    def is_costly(v) -> bool:
        if v not in costly:
            costly[v] = v.op in COSTLY or any(is_costly(a) for a in v.args if a not in row)
        return costly[v]

    kept, seen = [], set()

    def need(v) -> None:
        nonlocal budget
        if v in seen or v in row:
            return
        seen.add(v)
        size = R * (8 if COMPUTE[v.dtype] in ("double", "int64_t") else 4)
        if v in available and is_costly(v) and size <= budget:
            kept.append(v)
            budget -= size
            return
        for a in v.args:
            need(a)

    for out in outputs:
        need(out.value)
    return kept


def _identity(kind: str, dtype: torch.dtype) -> str:
    if kind in ("sum", "any"):
        return literal(0, dtype) if kind == "sum" else "0"
    if kind in ("prod", "all"):
        return literal(1, dtype) if kind == "prod" else "1"
    if dtype.is_floating_point:
        return literal(-math.inf if kind == "max" else math.inf, dtype)
    if dtype == torch.bool:  # max of bools is any, min is all
        return literal(kind == "min", dtype)
    info = torch.iinfo(dtype)
    return literal(info.min if kind == "max" else info.max, dtype)


_OMP_REDUCTION = {"sum": "+", "prod": "*", "max": "max", "min": "min", "any": "|", "all": "&"}


def _accumulate(kind: str, dtype: torch.dtype, acc: str, nan: str, arg: str) -> list[str]:
    """C statements combining `arg` into accumulator `acc` (`nan`: its NaN flag)."""
    if kind == "sum":
        return [f"{acc} += {arg};"]
    if kind == "prod":
        return [f"{acc} *= {arg};"]
    if kind in ("any", "all"):
        return [f"{acc} {'|' if kind == 'any' else '&'}= ({arg} != 0);"]
    cmp = ">" if kind == "max" else "<"
    lines = [f"{acc} = {arg} {cmp} {acc} ? {arg} : {acc};"]
    return lines + [f"{nan} |= {arg} != {arg};"] if dtype.is_floating_point else lines


def _finished(kind: str, dtype: torch.dtype, acc: str, nan: str) -> str:
    """The reduction's value once accumulator `acc` has seen the whole row."""
    if kind in ("max", "min") and dtype.is_floating_point:
        return f"{nan} ? {literal(math.nan, dtype)} : {acc}"
    if kind in ("any", "all"):
        return f"{acc} != 0"
    return acc


def _divide_by_row_value(a: str, b: str, dtype: torch.dtype, reciprocals: set, row_lines: list) -> str:
    """C text of a / b for a per-element a and a row value b: a times the
    row's 1 / b (a multiply per element, not a division), within an ulp and
    a half of a / b, where 1 / b is a normal number (the per-row test; GCC
    unswitches the loop on it); otherwise, and for b = 0, inf or NaN, a / b
    itself. The reciprocal and the test go to the row's lines, once per b."""
    ctype = COMPUTE[dtype]
    if b not in reciprocals:
        reciprocals.add(b)
        limit = 126 if ctype == "float" else 1022
        row_lines.append(f"const {ctype} {b}_inv = ({ctype})1 / {b};")
        row_lines.append(f"const bool {b}_inv_ok = fabs{_f(dtype)}({b}) >= 0x1p-{limit} "
                         f"&& fabs{_f(dtype)}({b}) <= 0x1p{limit};")
    return f"({b}_inv_ok ? {a} * {b}_inv : {a} / {b})"


def _tracks_nan(v: Value) -> bool:
    """A float max/min: NaN is tracked in a flag beside its accumulator."""
    return v.attr in ("max", "min") and v.dtype.is_floating_point


def _accumulator(v: Value, name: str) -> str:
    """The declaration of reduction v's accumulator `name`, at its identity."""
    ctype = "int" if v.attr in ("any", "all") else COMPUTE[v.dtype]
    return f"{ctype} {name} = {_identity(v.attr, v.dtype)};"


def _reduction_clauses(targets, accs: dict, flags: dict) -> str:
    """OpenMP reduction clauses for the accumulators `accs` (and the NaN flags
    `{flags[v]}_nan` of float max/min)."""
    clauses = ""
    for v in targets:
        clauses += f" reduction({_OMP_REDUCTION[v.attr]}:{accs[v]})"
        if _tracks_nan(v):
            clauses += f" reduction(|:{flags[v]}_nan)"
    return clauses


def _blocked_row_pass(targets, accs, inner, clauses, loop, R, uses_err, block: int) -> list[str]:
    """One pass over a row split between the threads: blocks of `block`
    positions, each reduced by an `omp simd` loop into block accumulators that
    then join the thread's (a 4M-element float sum summed lane by lane erred
    2e-5 against eager; in blocks it is as accurate as eager's cascade)."""
    err = " reduction(|:kitsune_err)" if uses_err else ""
    R = size_text(R)
    lines = [f"#pragma omp parallel for schedule(static) num_threads(threads){clauses}{err}",
             f"for (int64_t r0 = 0; r0 < {R}; r0 += {block}) {{"]
    lines += ["  " + _accumulator(v, inner[v]) for v in targets]
    inner_clauses = _reduction_clauses(targets, inner, accs)
    lines += [f"  const int64_t r_end = r0 + {block} < {R} ? r0 + {block} : {R};",
              f"  #pragma omp simd{inner_clauses}{err}",
              "  for (int64_t r = r0; r < r_end; ++r) {", "    const int64_t x = xrow + r;"]
    lines += ["  " + line for line in loop] + ["  }"]
    for v in targets:
        lines += ["  " + line for line in _accumulate(v.attr, v.dtype, accs[v], f"{accs[v]}_nan", inner[v])]
    return lines + ["}"]


def size_params(spec: KernelSpec) -> list[str]:
    """The kernel's symbolic sizes, each an argument after numel."""
    return [f"int64_t {name}" for name in spec.sizes]


def _tiles(rows, tile: int) -> str:
    """C text of the number of tiles of `tile` rows."""
    return str(-(-rows // tile)) if isinstance(rows, int) else f"({size_text(rows)} + {tile - 1}) / {tile}"


def few_rows(spec: KernelSpec, choices: LaunchChoices | None = None) -> bool:
    """Fewer rows than threads could share, each long: a whole-tensor sum.
    Its kernel walks the rows one after another and splits each pass over a
    row between the threads (an `omp parallel for simd` with reduction
    clauses) instead of giving each thread whole rows."""
    c = choices or launch_choices()
    return hint(spec.rows) < c.cpu_few_rows and hint(spec.numel) > c.cpu_parallel_threshold


class _CEmitter:
    """What the C reduction emitters share: the spec's analysis (`schedule`),
    fresh names, the lines emitted so far (`body`), and whether any of them
    may set the division-by-zero flag (`uses_err`: its OpenMP reduction
    clause is added to every loop emitted after that)."""

    def __init__(self, spec: KernelSpec, choices: LaunchChoices):
        self.spec, self.choices = spec, choices
        self.R, self.rows = spec.reduction, spec.rows
        self.schedule = ReductionSchedule.of(spec)
        self.row = self.schedule.row
        self.inputs = [i.name for i in spec.inputs]
        self.shared = _shared_exps(self.schedule.values)
        self.counter = iter(range(10**9))
        self.body: list[str] = []
        self.uses_err = False

    def fresh(self, prefix: str = "v") -> str:
        return f"{prefix}{next(self.counter)}"

    def expr(self, v: Value, scope: dict) -> str:
        """C text of v; row values read their inputs at the row's first element."""
        text = _expr(v, scope, self.inputs, var="xrow" if v in self.row else "x", rows=self.R, shared=self.shared)
        self.uses_err |= "kitsune_err" in text
        return text

    def operands(self, v: Value, scope: dict, out: list, indent: str) -> None:
        """Emit what v is computed from (checking that it is not a reduction yet to come)."""
        if v.op == "reduce":
            raise KernelError(f"{self.spec.name}: reduction used before it is computed")
        for a in _operands(v, self.shared):
            self.emit(a, scope, out, indent)

    def err_clause(self) -> str:
        return " reduction(|:kitsune_err)" if self.uses_err else ""

    def function(self, fn_name: str, comment: str, opening: list[str]) -> str:
        """The C function: header comment, signature, `opening` (the loop over
        rows or tiles, opened), the body inside it, and the return."""
        spec = self.spec
        params = [f"const {STORAGE[i.dtype]} *restrict {i.name}" for i in spec.inputs]
        params += [f"{STORAGE[o.dtype]} *restrict {o.name}" for o in spec.outputs]
        params += ["int64_t numel", *size_params(spec), "int threads"]
        header = "\n".join(f"// {line}" for line in (spec.description or spec.name).splitlines())
        lines = [header, comment, f"int {fn_name}({', '.join(params)}) {{", "  int kitsune_err = 0;", *opening]
        lines += [f"    {line}" for line in self.body]
        lines += ["  }", "  return kitsune_err;", "}", ""]
        return "\n".join(lines)


def _emit_reduction(spec: KernelSpec, fn_name: str, choices: LaunchChoices) -> str:
    return _RowReductionEmitter(spec, choices).source(fn_name)


class _RowReductionEmitter(_CEmitter):
    """A reduction kernel whose threads split the rows (or, for few rows, each
    row's passes): per row, the row values of stage 0, one loop per reduction
    stage, a last loop for the per-element outputs, the row outputs."""

    def __init__(self, spec: KernelSpec, choices: LaunchChoices):
        super().__init__(spec, choices)
        self.split_rows = few_rows(spec, choices)
        self.names: dict = {}
        self.kept: dict = {}  # Value -> its buffer element, "keptN[r]"
        self.reciprocals: set = set()  # row values whose reciprocal the row has computed

    def emit(self, v: Value, scope: dict, out: list, indent: str) -> str:
        """Name of v in `scope`, emitting it (and what it needs) first."""
        if v in scope:
            return scope[v]
        self.operands(v, scope, out, indent)
        name = self.fresh()
        if v.op == "truediv" and v.dtype.is_floating_point and v not in self.row and v.args[1] in self.row:
            text = _divide_by_row_value(scope[v.args[0]], scope[v.args[1]], v.dtype, self.reciprocals, self.body)
        else:
            text = self.expr(v, scope)
        out.append(f"{indent}const {COMPUTE[v.dtype]} {name} = {text};")
        scope[v] = name
        return name

    def loop_header(self, clauses: str) -> list[str]:
        pragma = "parallel for simd schedule(static) num_threads(threads)" if self.split_rows else "simd"
        return [f"#pragma omp {pragma}{clauses}{self.err_clause()}",
                f"for (int64_t r = 0; r < {size_text(self.R)}; ++r) {{",
                "  const int64_t x = xrow + r;"]

    def row_stage(self, s: int) -> None:
        for v in self.schedule.row_stage_values(s):
            self.emit(v, self.names, self.body, "")

    def source(self, fn_name: str) -> str:
        schedule = self.schedule
        self.row_stage(0)
        for s in range(schedule.max_stage):
            self.stage_pass(s, schedule.reductions_of_stage(s + 1))
            self.row_stage(s + 1)
        self.store_outputs()
        rows, R = self.rows, self.R
        comment = f"// {rows} rows x {R} reduced elements" + (
            "; each row's passes split between the threads" if self.split_rows else "")
        opening = [] if self.split_rows else [
            f"  #pragma omp parallel for schedule(static) num_threads(threads) "
            f"if(numel >= {self.choices.cpu_parallel_threshold}){self.err_clause()}"]
        opening += [f"  for (int64_t row = 0; row < {size_text(rows)}; ++row) {{",
                    f"    const int64_t xrow = row * {size_text(R)};"]
        return self.function(fn_name, comment, opening)

    def stage_pass(self, s: int, targets: list) -> None:
        """One loop over the row accumulating stage s + 1's reductions (and
        storing the early outputs, and keeping costly values for the last loop)."""
        R, body = self.R, self.body
        loop: list[str] = []
        scope = {k: n for k, n in self.names.items() if k in self.row}
        accs = {v: self.fresh("acc") for v in targets}
        for v in targets:
            body.append(_accumulator(v, accs[v]))
            if _tracks_nan(v):
                body.append(f"int {accs[v]}_nan = 0;")
        clauses = _reduction_clauses(targets, accs, accs)
        # a row split between threads: each thread sums blocks of cpu_split_block
        # positions into block accumulators (`_b`), then those into its own
        inner = {v: f"{accs[v]}_b" if self.split_rows else accs[v] for v in targets}
        for v in targets:
            arg = self.emit(v.args[0], scope, loop, "  ")
            loop += ["  " + line for line in _accumulate(v.attr, v.dtype, inner[v], f"{accs[v]}_nan", arg)]
        for out in self.schedule.early_outputs if s == 0 else ():
            value = self.emit(out.value, scope, loop, "  ")
            loop.append("  " + _store_c(out, value, "x", R))
        if s == self.schedule.max_stage - 1 and self.schedule.late_outputs:
            self.keep_costly_values(scope, loop)
        if self.split_rows:
            body += _blocked_row_pass(targets, accs, inner, clauses, loop, R, self.uses_err,
                                      self.choices.cpu_split_block)
        else:
            body += self.loop_header(clauses) + loop + ["}"]
        for v in targets:
            name = self.fresh()
            body.append(f"const {COMPUTE[v.dtype]} {name} = {_finished(v.attr, v.dtype, accs[v], f'{accs[v]}_nan')};")
            self.names[v] = name

    def keep_costly_values(self, scope: dict, loop: list) -> None:
        """Row buffers for the costly values the last loop would recompute (`_kept_values`)."""
        available = {v: n for v, n in scope.items() if v not in self.row}
        budget = 0 if is_symbolic(self.R) else self.choices.cpu_row_buffer_bytes  # no row of unknown length on the stack
        for v in _kept_values(list(self.schedule.late_outputs), available, self.row, hint(self.R), budget):
            buffer = self.fresh("kept")
            self.body.append(f"{COMPUTE[v.dtype]} {buffer}[{size_text(self.R)}];")
            loop.append(f"  {buffer}[r] = {available[v]};")
            self.kept[v] = f"{buffer}[r]"

    def store_outputs(self) -> None:
        """The last loop storing the per-element outputs, then the row outputs."""
        if self.schedule.late_outputs:
            scope = {k: n for k, n in self.names.items() if k in self.row}
            scope.update(self.kept)
            loop: list[str] = []
            for out in self.schedule.late_outputs:
                value = self.emit(out.value, scope, loop, "  ")
                loop.append("  " + _store_c(out, value, "x", self.R))
            self.body += self.loop_header("") + loop + ["}"]
        for out in self.schedule.row_outputs:
            value = self.emit(out.value, self.names, self.body, "")
            self.body.append(_store_c(out, value, "xrow", self.R))


# -- outer (column) reductions -------------------------------------------------
#
# When adjacent rows are adjacent in memory (a bias gradient: [N, C] summed
# over N, one row per column c), walking a row strides through memory. The
# kernel takes a tile of adjacent rows instead (`outer_tile`): threads split the
# tiles, and for each position r along the rows one `omp simd` loop over the
# tile's rows reads contiguous memory and accumulates into per-row arrays.
# Row values (the reductions' results and what is computed from them) are
# arrays over the tile, indexed by j. Tile bounds, the stack budget and the
# compensation threshold: `LaunchChoices.cpu_outer_*`, `cpu_compensate_after`.


def outer_tile(rows: int, threads: int, choices: LaunchChoices | None = None) -> int:
    """Rows per tile: as wide as an even split over the threads allows (up to
    `cpu_outer_tile_max`), so that each position's read is one long contiguous
    run (see `LaunchChoices`)."""
    c = choices or launch_choices()
    share = -(-rows // max(threads, 1))
    return max(min(-(-share // 16) * 16, c.cpu_outer_tile_max), min(c.cpu_outer_tile_min, rows))


def _emit_outer_reduction(spec: KernelSpec, fn_name: str, choices: LaunchChoices) -> str:
    tile = outer_tile(hint(spec.rows), torch.get_num_threads(), choices)
    while True:
        emitter = _OuterReductionEmitter(spec, choices, tile)
        source = emitter.source(fn_name)
        # per-row arrays live on the thread's stack: keep them well inside it
        if emitter.arrays() * tile * 8 <= choices.cpu_outer_stack_bytes or tile <= choices.cpu_outer_tile_min:
            return source
        tile //= 2


class _OuterReductionEmitter(_CEmitter):
    """An outer reduction kernel over tiles of `tile` adjacent rows: per tile,
    loops over its rows (j) for row values, and per stage a loop over the
    positions r whose inner `omp simd` loop over j accumulates into per-row
    arrays; then the per-element and the row outputs."""

    def __init__(self, spec: KernelSpec, choices: LaunchChoices, tile: int):
        super().__init__(spec, choices)
        self.tile = tile
        self.names: dict = {}  # row Value -> "arr[j]"
        self.position = ["const int64_t row = row0 + j;", "const int64_t xrow = row * " + size_text(self.R) + ";"]

    def emit(self, v: Value, scope: dict, out: list, indent: str) -> str:
        """Name of v in `scope`, emitting it (and what it needs) first: a row
        value of the tile (`scope is names`) as an array over the tile."""
        if v in scope:
            return scope[v]
        self.operands(v, scope, out, indent)
        name = self.fresh()
        text = self.expr(v, scope)
        if v.op == "const":  # one per kernel, visible to every loop
            self.body.append(f"const {COMPUTE[v.dtype]} {name} = {text};")
            self.names[v] = scope[v] = name
            return name
        if v in self.row and scope is self.names:
            self.body.append(f"{COMPUTE[v.dtype]} {name}[{self.tile}];")
            out.append(f"{indent}{name}[j] = {text};")
            name = f"{name}[j]"
        else:
            out.append(f"{indent}const {COMPUTE[v.dtype]} {name} = {text};")
        scope[v] = name
        return name

    def row_loop(self, vs) -> None:
        loop: list[str] = []
        for v in vs:
            self.emit(v, self.names, loop, "  ")
        if loop:
            self.body.extend(["for (int64_t j = 0; j < width; ++j) {"] + ["  " + p for p in self.position]
                             + loop + ["}"])

    def element_loop(self, inner: list[str]) -> list[str]:
        loop = ["  " + p for p in self.position] + ["  const int64_t x = xrow + r;"] + inner
        loop = [f"#pragma omp simd{self.err_clause()}", "for (int64_t j = 0; j < width; ++j) {"] + loop + ["}"]
        return [f"for (int64_t r = 0; r < {size_text(self.R)}; ++r) {{"] + ["  " + p for p in loop] + ["}"]

    def arrays(self) -> int:
        """How many arrays over the tile the kernel declares (on the thread's stack)."""
        return sum(line.endswith(f"[{self.tile}];") for line in self.body)

    def source(self, fn_name: str) -> str:
        schedule, rows, tile = self.schedule, self.rows, self.tile
        self.row_loop(schedule.row_stage_values(0))
        for s in range(schedule.max_stage):
            self.stage_pass(s, schedule.reductions_of_stage(s + 1))
            self.row_loop(schedule.row_stage_values(s + 1))
        self.store_outputs()
        comment = f"// {rows} rows x {self.R} reduced elements, outer layout: tiles of {tile} adjacent rows"
        opening = [
            f"  #pragma omp parallel for schedule(static) num_threads(threads) "
            f"if(numel >= {self.choices.cpu_parallel_threshold}){self.err_clause()}",
            f"  for (int64_t t = 0; t < {_tiles(rows, tile)}; ++t) {{",
            f"    const int64_t row0 = t * {tile};",
            f"    const int64_t width = row0 + {tile} <= {size_text(rows)} ? {tile} : {size_text(rows)} - row0;",
        ]
        return self.function(fn_name, comment, opening)

    def stage_pass(self, s: int, targets: list) -> None:
        """Stage s + 1's reductions: accumulators over the tile, the pass over
        the positions (storing the early outputs), and the finished values."""
        scope = dict(self.names)
        loop: list[str] = []
        init: list[str] = []
        accs = {v: self.declare_accumulator(v, init) for v in targets}
        compensated = set()
        for v in targets:
            arg = self.emit(v.args[0], scope, loop, "    ")
            if v.attr == "sum" and v.dtype.is_floating_point and \
                    (is_symbolic(self.R) or self.R > self.choices.cpu_compensate_after):
                compensated.add(v)
                loop += self.compensated_step(v, accs[v], arg, init)
            else:
                loop += ["    " + line for line in _accumulate(v.attr, v.dtype, f"{accs[v]}[j]",
                                                                f"{accs[v]}_nan[j]", arg)]
        for out in self.schedule.early_outputs if s == 0 else ():
            value = self.emit(out.value, scope, loop, "    ")
            loop.append("    " + _store_c(out, value, "x", self.R))
        self.body += ["for (int64_t j = 0; j < width; ++j) {"] + init + ["}"]
        self.body += self.element_loop(loop)
        finish = []
        for v in targets:
            acc, name = f"{accs[v]}[j]", self.fresh()
            if v in compensated:
                plain = f"{accs[v]}_plain[j]"
                text = f"{plain} - {plain} == 0 ? {acc} - {accs[v]}_c[j] : {plain}"  # finite: compensated
            else:
                text = _finished(v.attr, v.dtype, acc, f"{accs[v]}_nan[j]")
            self.body.append(f"{COMPUTE[v.dtype]} {name}[{self.tile}];")
            finish.append(f"  {name}[j] = {text};")
            self.names[v] = f"{name}[j]"
        self.body += ["for (int64_t j = 0; j < width; ++j) {"] + finish + ["}"]

    def declare_accumulator(self, v: Value, init: list) -> str:
        """Declare reduction v's per-row accumulator (and NaN flag); `init` sets them."""
        acc = self.fresh("acc")
        ctype = "int" if v.attr in ("any", "all") else COMPUTE[v.dtype]
        self.body.append(f"{ctype} {acc}[{self.tile}];")
        init.append(f"  {acc}[j] = {_identity(v.attr, v.dtype)};")
        if _tracks_nan(v):
            self.body.append(f"int {acc}_nan[{self.tile}];")
            init.append(f"  {acc}_nan[j] = 0;")
        return acc

    def compensated_step(self, v: Value, acc: str, arg: str, init: list) -> list[str]:
        """A column walked one position at a time would lose bits (summed in
        order, 4096 floats erred twice as much as eager's cascade):
        Kahan-compensated, with the plain sum kept for inf/NaN (where the
        compensation itself turns into NaN)."""
        ctype, tile = COMPUTE[v.dtype], self.tile
        self.body.append(f"{ctype} {acc}_c[{tile}], {acc}_plain[{tile}];")
        init.append(f"  {acc}_c[j] = {acc}_plain[j] = {literal(0, v.dtype)};")
        return [f"    {acc}_plain[j] += {arg};",
                f"    const {ctype} {acc}_y = {arg} - {acc}_c[j];",
                f"    const {ctype} {acc}_t = {acc}[j] + {acc}_y;",
                f"    {acc}_c[j] = ({acc}_t - {acc}[j]) - {acc}_y;",
                f"    {acc}[j] = {acc}_t;"]

    def store_outputs(self) -> None:
        """The pass storing the per-element outputs, then a loop over the tile's rows for the row outputs."""
        if self.schedule.late_outputs:
            scope = dict(self.names)
            loop: list[str] = []
            for out in self.schedule.late_outputs:
                value = self.emit(out.value, scope, loop, "    ")
                loop.append("    " + _store_c(out, value, "x", self.R))
            self.body += self.element_loop(loop)
        if self.schedule.row_outputs:
            loop = []
            for out in self.schedule.row_outputs:
                value = self.emit(out.value, self.names, loop, "  ")
                loop.append("  " + _store_c(out, value, "xrow", self.R))
            self.body.extend(["for (int64_t j = 0; j < width; ++j) {"] + ["  " + p for p in self.position]
                             + loop + ["}"])


def _store_c(out, value: str, var: str, rows: int | None = None) -> str:
    if out.value.dtype != out.dtype:
        raise KernelError(f"output {out.name} stores {out.value.dtype} into {out.dtype}")
    if out.dtype == torch.bfloat16:
        value = f"kitsune_f32_to_bf16({value})"
    elif out.dtype == torch.float16:
        value = f"(_Float16){value}"
    return f"{out.name}[{_render(out.index, var, rows)}] = {value};"
