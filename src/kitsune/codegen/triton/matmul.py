"""A generated Triton matmul whose epilogue is applied before the store.

Issue 15's choice (c): for `mm`/`addmm`/`bmm` whose product only a pointwise
epilogue kernel reads, one kernel computes a tile of the product in float32
registers (`tl.dot`, blocks walked along K), rounds it to the product's dtype
(what eager stores, so the result equals cuBLAS + the epilogue kernel up to
the matmul's own summation order) and evaluates the epilogue kernel's own
`KernelSpec` over the tile: the product's loads become the rounded
accumulator, every other input (a bias [N], a residual [M, N], scalars) is
loaded at its index. The product never goes to memory.

The epilogue is rendered by `emit.pointwise_body`, the same renderer the
planner's epilogue kernels use, over the 2-d tile with the names the row
kernels use: `row` (the product's row, batches stacked), `r` (its column) and
`x = row * N + r`, the spec's flat index; so a bias read at `x % N` is read
at `r`, without a division.

Several products of one left operand (SwiGLU's `silu(a @ W1) * (a @ W2)`)
share the loads of `a`: one accumulator per right operand.

Launch order: programs are grouped `group_m` tile-rows at a time (Triton's
tutorial order, as Inductor's templates do), so the tiles running together
share rows of `a` and columns of `b` in L2. A batch (`bmm`) is the grid's
second axis.

Not done (a note for later): a persistent variant (one program per SM
walking tiles) and TMA descriptors (Hopper). Both change only the
main loop's addressing; the epilogue rendering here would stay as it is.
They are left out because the Triton interpreter, which the CPU test suite
runs, cannot check TMA, and an unchecked kernel is worse than a slower one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kitsune.codegen.kernel import INDEX_LIMIT, KernelError, KernelSpec
from kitsune.codegen.triton.emit import _pointer, pointwise_body
from kitsune.codegen.triton.libm import INTERPRETED
from kitsune.codegen.triton.ops import TL_DTYPE
from kitsune.ir.index import Index, within
from kitsune.ir.scalar import Value

MATMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if not INTERPRETED:
    @triton.jit
    def dot_operand(x):
        """A block as `tl.dot` takes it: as loaded (tensor cores read bf16/fp16)."""
        return x
else:
    @triton.jit
    def dot_operand(x):
        """The interpreter multiplies numpy arrays, which have no bfloat16 (its
        bf16 blocks are raw bits): widen to float32, exactly (the products of two
        bf16/fp16 values are exact in float32, as on tensor cores)."""
        return x.to(tl.float32)


@dataclass(frozen=True)
class MatmulConfig:
    """One tiling of the generated matmul (block sizes, launch order, warps, pipeline stages)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # one program per SM walking the tiles (`num_programs` of them, a kernel
    # argument) instead of one program per tile
    persistent: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"MatmulConfig.{name} must be a power of two >= 16 (tl.dot), got {size}")

    @property
    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
                + (" persistent" if self.persistent else ""))

    def fitted(self, dtype: torch.dtype, products: int = 1) -> "MatmulConfig":
        """This tiling within an H100's shared memory and registers: float32
        tiles take twice the shared memory (half the K block); each further
        product keeps another accumulator (at most 128 columns then)."""
        block_k = self.block_k // 2 if dtype == torch.float32 and self.block_k > 32 else self.block_k
        block_n = min(self.block_n, 128) if products > 1 else self.block_n
        return replace(self, block_n=block_n, block_k=block_k)


# The configurations measured on the first real inputs (issue 15): square and
# wide tiles for large products, a narrow one for few rows.
CONFIGS = (
    MatmulConfig(128, 128, 64, 8, 4, 4),
    MatmulConfig(128, 128, 64, 8, 8, 3),
    MatmulConfig(128, 256, 64, 8, 8, 3),
    MatmulConfig(64, 128, 64, 8, 4, 4),
    MatmulConfig(128, 256, 64, 8, 8, 3, persistent=True),
)


@dataclass(frozen=True)
class MatmulEpilogue:
    """A product (or several products of one left operand) and the epilogue
    kernel that reads it.

    spec:     the planner's pointwise epilogue kernel, over the product's elements
    products: the spec's input slots that are the products, one per right operand, in order
    batch, m, n, k: sizes (batch 1 for `mm`)
    dtype:    the operands' and the products' dtype
    biases:   per product, whether addmm's input is added to it before rounding
    alpha, beta: addmm's scales (product = alpha * a @ b + beta * bias)
    """

    spec: KernelSpec
    products: tuple[int, ...]
    batch: int
    m: int
    n: int
    k: int
    dtype: torch.dtype
    biases: tuple[bool, ...] = ()
    alpha: float = 1.0
    beta: float = 1.0
    precision: str = "ieee"  # float32 products: "ieee", or "tf32" where eager allows TF32
    wide: bool = False  # 64-bit offsets (an operand reaches past INDEX_LIMIT elements)

    def __post_init__(self):
        if not self.biases:
            object.__setattr__(self, "biases", (False,) * len(self.products))
        why = epilogue_refusal(self)
        if why is not None:
            raise KernelError(f"{self.spec.name}: no fused matmul: {why}")


def epilogue_refusal(epi: MatmulEpilogue) -> str | None:
    """Why `epi`'s epilogue cannot be applied to the matmul's tile, or None."""
    spec = epi.spec
    if not epi.products:
        return "no product slot named"
    if len(set(epi.products)) != len(epi.products) or len(epi.biases) != len(epi.products):
        return "product slots repeat, or one bias flag per product is missing"
    if any(not 0 <= s < len(spec.inputs) for s in epi.products):
        return f"a product slot is not an input of the kernel ({len(spec.inputs)} inputs)"
    if epi.dtype not in MATMUL_DTYPES:
        return f"{epi.dtype} operands"
    if any(spec.inputs[s].dtype != epi.dtype for s in epi.products):
        return "a product slot has another dtype than the matmul"
    if spec.reduction:
        return "the epilogue has a reduction"
    if spec.sizes:
        return "symbolic sizes"
    if spec.numel != epi.batch * epi.m * epi.n:
        return f"the epilogue iterates over {spec.numel} elements, the product has {epi.batch * epi.m * epi.n}"
    at_x = (Index.var(), within(Index.var(), spec.numel))  # x itself (a single element: 0)
    for v in spec.values():
        if v.op in ("load_at", "reduce", "check_index"):  # check_index: a device assert needs a debug build
            return f"the epilogue uses {v.op}"
        slot = v.attr[0] if v.op in ("load", "load_where") else None
        if slot in epi.products and spec.numel and not (v.op == "load" and v.attr[1] in at_x):
            return "the epilogue reads a product at another element than the one it writes"
    if not any(v.op == "load" and v.attr[0] in epi.products for v in spec.values()):
        return "the epilogue does not read the product"
    return None


def _rounded(acc: str, dtype: torch.dtype) -> str:
    """The float32 accumulator as eager stores it (rounded to `dtype`), widened back."""
    if dtype == torch.bfloat16:
        return f"round_bf16({acc})"
    if dtype == torch.float16:
        return f"{acc}.to(tl.float16).to(tl.float32)"
    return acc


def _wide(epi: MatmulEpilogue) -> bool:
    """64-bit offsets: asked for (an operand's extent), the epilogue's own rule, or operands that large."""
    b, m, n, k = epi.batch, epi.m, epi.n, epi.k
    return epi.wide or epi.spec.wide_index() or max(b * m * k, b * k * n, b * m * n) >= INDEX_LIMIT


def kernel_params(epi: MatmulEpilogue, config: MatmulConfig) -> list[str]:
    """The generated kernel's arguments, in order (the launcher passes them so)."""
    inputs = [i.name for s, i in enumerate(epi.spec.inputs) if s not in epi.products]
    params = ["a_ptr", *[f"b{j}_ptr" for j in range(len(epi.products))],
              *[f"bias{j}_ptr" for j, has in enumerate(epi.biases) if has], *inputs,
              *[o.name for o in epi.spec.outputs], "stride_ab", "stride_am", "stride_ak"]
    for j in range(len(epi.products)):
        params += [f"stride_b{j}b", f"stride_b{j}k", f"stride_b{j}n"]
    for j, has in enumerate(epi.biases):
        if has:
            params += [f"stride_bias{j}b", f"stride_bias{j}m", f"stride_bias{j}n"]
    return params + (["num_programs"] if config.persistent else [])


def emit_matmul(epi: MatmulEpilogue, fn_name: str, config: MatmulConfig) -> str:
    """Source of a module defining the @triton.jit kernel `fn_name`: the
    matmul of `epi` tiled by `config`, its epilogue applied before the store."""
    config = config.fitted(epi.dtype, len(epi.products))
    lines = _prologue(epi, config) + _main_loop(epi, config) + _epilogue(epi, config)
    if config.persistent:  # the same tile's work, for each tile this program walks
        tiles = -(-epi.m // config.block_m) * -(-epi.n // config.block_n)
        pid, rest = lines[0], lines[1:]
        lines = [f"for tile in range(tl.program_id(0), {tiles}, num_programs):",
                 "    " + pid.replace("tl.program_id(0)", "tile"), *[f"    {line}" for line in rest]]
    header = "\n".join(f"# {line}" for line in (epi.spec.description or epi.spec.name).splitlines())
    return "\n".join([
        "import triton",
        "import triton.language as tl",
        "from kitsune.codegen.triton.libm import gelu_erf, libm, one_plus_erf, round_bf16",
        "from kitsune.codegen.triton.matmul import dot_operand",
        "",
        f"# matmul {epi.batch}x{epi.m}x{epi.n}x{epi.k} {epi.dtype} ({len(epi.products)} product(s)), "
        f"tiles {config.label}, then the epilogue:",
        header,
        "@triton.jit",
        f"def {fn_name}({', '.join(kernel_params(epi, config))}):",
        *[f"    {line}" for line in lines],
    ]) + "\n"


def _prologue(epi: MatmulEpilogue, c: MatmulConfig) -> list[str]:
    """This program's tile (grouped launch order) and its first pointers."""
    M, N = epi.m, epi.n
    cast = ".to(tl.int64)" if _wide(epi) else ""
    tiles_m, in_group = -(-M // c.block_m), c.group_m * -(-N // c.block_n)
    lines = [
        f"pid = tl.program_id(0){cast}",
        f"batch = tl.program_id(1){cast}",
        # group_m tile-rows side by side: the tiles running together share rows of a and columns of b in L2
        f"first_m = (pid // {in_group}) * {c.group_m}",
        f"group_rows = tl.minimum({tiles_m} - first_m, {c.group_m})",
        f"pid_m = first_m + (pid % {in_group}) % group_rows",
        f"pid_n = (pid % {in_group}) // group_rows",
        f"rm = pid_m * {c.block_m} + tl.arange(0, {c.block_m})",
        f"rn = pid_n * {c.block_n} + tl.arange(0, {c.block_n})",
        # rows and columns past the edge read rows/columns from the start (in
        # bounds): the K loop needs no mask for them, and the store leaves them out
        _wrapped("ram", "rm", M, c.block_m),
        _wrapped("rbn", "rn", N, c.block_n),
        f"rk = tl.arange(0, {c.block_k})",
        "a_ptrs = a_ptr + batch * stride_ab + ram[:, None] * stride_am + rk[None, :] * stride_ak",
    ]
    for j in range(len(epi.products)):
        lines += [f"b{j}_ptrs = b{j}_ptr + batch * stride_b{j}b + rk[:, None] * stride_b{j}k "
                  f"+ rbn[None, :] * stride_b{j}n",
                  f"acc{j} = tl.zeros([{c.block_m}, {c.block_n}], dtype=tl.float32)"]
    return lines


def _wrapped(name: str, offsets: str, size: int, block: int) -> str:
    """`offsets % size`, with the hint that a block is `block` contiguous
    offsets from a multiple of `block` (vector loads along a contiguous M or N)
    only where that holds: `size` a multiple of `block` (at a partial last
    block the wrap breaks the run, and a vector load would read past the end)."""
    if size % block:
        return f"{name} = {offsets} % {size}"
    return f"{name} = tl.max_contiguous(tl.multiple_of({offsets} % {size}, {block}), {block})"


def _main_loop(epi: MatmulEpilogue, c: MatmulConfig) -> list[str]:
    """The K loop: one block of `a` and of each right operand, multiplied into the accumulators."""
    K, bk = epi.k, c.block_k
    precision = f", input_precision=\"{epi.precision}\"" if epi.dtype == torch.float32 else ""
    if K % bk:  # the last block is partial: zeros past K contribute nothing
        load_a = f"tl.load(a_ptrs, mask=rk[None, :] < {K} - k0, other=0.0)"
        load_b = "tl.load(b{j}_ptrs, mask=rk[:, None] < " + f"{K} - k0, other=0.0)"
    else:
        load_a, load_b = "tl.load(a_ptrs)", "tl.load(b{j}_ptrs)"
    lines = [f"for k0 in range(0, {K}, {bk}):  # pipelined num_stages deep (a launch option)",
             f"    a = {load_a}"]
    for j in range(len(epi.products)):
        lines += [f"    b{j} = {load_b.format(j=j)}",
                  f"    acc{j} = tl.dot(dot_operand(a), dot_operand(b{j}), acc{j}{precision})",
                  f"    b{j}_ptrs += {bk} * stride_b{j}k"]
    lines.append(f"    a_ptrs += {bk} * stride_ak")
    return lines


def _epilogue(epi: MatmulEpilogue, c: MatmulConfig) -> list[str]:
    """Each product rounded as eager stores it, the epilogue's values over the
    tile, and its outputs stored where the tile is inside the product."""
    M, N, spec = epi.m, epi.n, epi.spec
    # Positions past the edge are wrapped (ram, rbn): every epilogue read is then
    # in bounds without a mask (a bias stays a [1, BLOCK_N] load), and what the
    # wrapped lanes compute is never stored.
    lines = [f"row = (batch * {M} + ram)[:, None]  # the product's row, batches stacked",
             "r = rbn[None, :]  # its column",
             f"x = row * {N} + r  # the epilogue kernel's flat index",
             f"xmask = (rm[:, None] < {M}) & (rn[None, :] < {N})  # the tile's part inside the product"]
    full = M % c.block_m == 0 and N % c.block_n == 0  # every tile is whole: stores need no mask
    given: dict[Value, str] = {}
    for j, slot in enumerate(epi.products):
        acc = f"acc{j}"
        if epi.alpha != 1.0:
            acc = f"{acc} * {float(epi.alpha)!r}"
        if epi.biases[j]:
            lines.append(f"bias{j} = tl.load(bias{j}_ptr + batch * stride_bias{j}b + ram[:, None] * stride_bias{j}m"
                         f" + rbn[None, :] * stride_bias{j}n).to(tl.float32)")
            acc = f"{acc} + bias{j}" if epi.beta == 1.0 else f"{acc} + bias{j} * {float(epi.beta)!r}"
        lines.append(f"p{j} = {_rounded(f'({acc})', epi.dtype)}  # product {j} as eager stores it")
        for v in spec.values():
            if v.op == "load" and v.attr[0] == slot:
                given[v] = f"p{j}"
    names, body = pointwise_body(spec, given, mask=None, rows=N)
    lines += body
    shape = f"[{c.block_m}, {c.block_n}]"
    for out in spec.outputs:
        if out.value.dtype != out.dtype:
            raise KernelError(f"{spec.name}: output {out.name} stores {out.value.dtype} into {out.dtype}")
        value = f"tl.broadcast_to({names[out.value]}, {shape})"
        if out.dtype == torch.bfloat16:
            value = f"round_bf16({value})"
        pointer = f"tl.broadcast_to({_pointer(out, 'x', N)}, {shape})"  # an index of row (or r) alone is 1-wide
        lines.append(f"tl.store({pointer}, {value}.to({TL_DTYPE[out.dtype]}){'' if full else ', xmask'})")
    return lines
