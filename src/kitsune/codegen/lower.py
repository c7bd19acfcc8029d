"""Lower a planned fusion group into a backend-neutral `KernelSpec`.

Each node's value at a logical index (one `Index` per dimension) is built
recursively: a member applies its op-table formula to its arguments' values
at the broadcast index; a view maps the index back to its source; anything
outside the group is a load from a tensor at `sum(index_d * stride_d)`.
The kernel iterates over its first output in memory order, so stores are
contiguous; all other outputs of the same size are written at the same step.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx

from kitsune.codegen.indexing import INDEXING_LOWERINGS
from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec, is_row_index
from kitsune.ir.graph import is_view, meta, view_root
from kitsune.ir.index import Index, delinearize, linearize, same_on, strided, within
from kitsune.ir.ops import (POINTWISE_OPS, REDUCTION_OPS, NotFusible, aten, norm_dim, op_name, prims,
                            reduction_signature)
from kitsune.ir.scalar import (Value, call, cast, check_index, const, coordinate, load, load_at, load_where, reduce,
                               walk, where)
from kitsune.sizes import (as_size, free_symbols, hint, is_symbolic, known, max_offset, product, renderable,
                           shape_of, strides_of)
from kitsune.planner.pointwise import FusionGroup, group_outputs


def _broadcast(idx: tuple, out_shape, in_shape) -> tuple:
    lead = len(out_shape) - len(in_shape)
    return tuple(Index.constant(0) if in_shape[j] == 1 else idx[lead + j] for j in range(len(in_shape)))


def view_source_index(node: fx.Node, idx: tuple) -> tuple:
    """The index into node.args[0] that view `node` reads at `idx`."""
    src_shape = shape_of(meta(node.args[0]))
    out_shape = shape_of(meta(node))
    target, args = node.target, node.args
    if target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return tuple(delinearize(linearize(idx, out_shape), src_shape))
    if target is aten.expand.default:
        return _broadcast(idx, out_shape, src_shape)
    if target is aten.permute.default:
        src = [None] * len(src_shape)
        for i, d in enumerate(args[1]):
            src[norm_dim(d, len(src_shape))] = idx[i]
        return tuple(src)
    if target in (aten.transpose.int, aten.t.default):
        d0, d1 = (args[1], args[2]) if target is aten.transpose.int else (0, 1)
        src = list(idx)
        if len(src) >= 2:
            d0, d1 = norm_dim(d0, len(src)), norm_dim(d1, len(src))
            src[d0], src[d1] = src[d1], src[d0]
        return tuple(src)
    if target is aten.alias.default:
        return idx
    if target is prims.broadcast_in_dim.default:
        # source dim i is output dim args[2][i]; size-1 source dims broadcast
        return tuple(Index.constant(0) if src_shape[i] == 1 and out_shape[d] != 1 else idx[d]
                     for i, d in enumerate(args[2]))
    if target is aten.unsqueeze.default:
        dim = norm_dim(args[1], len(out_shape))
        return idx[:dim] + idx[dim + 1:]
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        if target is aten.squeeze.default:
            dims = range(len(src_shape))
        else:
            dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        squeezed = {norm_dim(d, len(src_shape)) for d in dims if src_shape[norm_dim(d, len(src_shape))] == 1}
        rest = iter(idx)
        return tuple(Index.constant(0) if d in squeezed else next(rest) for d in range(len(src_shape)))
    if target is aten.slice.Tensor:
        dim = norm_dim(args[1] if len(args) > 1 else 0, len(src_shape))
        start = as_size(args[2]) if len(args) > 2 and args[2] is not None else 0
        step = as_size(args[4]) if len(args) > 4 else 1
        size = src_shape[dim]
        if is_symbolic(start) or is_symbolic(size):
            if not (known(start >= 0) and known(start <= size)):
                raise NotFusible(f"slice start {start} of a dimension of {size}: not known to be in range")
        else:
            start = min(max(start + size if start < 0 else start, 0), size)
        src = list(idx)
        src[dim] = idx[dim] * step + start
        return tuple(src)
    if target is aten.select.int:
        dim = norm_dim(args[1], len(src_shape))
        index = as_size(args[2])
        if is_symbolic(index) or is_symbolic(src_shape[dim]):
            if not known(index >= 0):
                raise NotFusible(f"select of index {index}: not known to be non-negative")
        elif index < 0:
            index = index + src_shape[dim]
        return idx[:dim] + (Index.constant(index),) + idx[dim:]
    raise NotFusible(f"view {op_name(target)} cannot be folded into indexing")


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(node: fx.Node, opdef) -> torch.dtype | None:
    """The dtype an op computes in. Like eager, float16/bfloat16 ops compute in
    float32 and round their result once (the cast back in `_apply_formula`), so
    a chain rounds after every op exactly where eager does."""
    if opdef.compute == "out":
        dtype = meta(node).dtype
    elif opdef.compute == "bool":
        return torch.bool
    elif opdef.compute == "promote":
        a, b = (_typed(x) for x in node.args[:2])
        dtype = torch.result_type(a, b)
    else:
        return None
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class GroupLowering:
    def __init__(self, group: FusionGroup):
        self.members = set(group.nodes)
        self.inputs: dict[fx.Node, int] = {}
        self.memo: dict = {}
        self.frame = group.frame  # (full shape, reduced dims) of a reduction group, else None
        self.numel = group.numel
        self.extents: dict[int, object] = {}  # input slot -> its largest element offset + 1
        self._masked: dict = {}
        self.walk = frame_walk(group)  # the frame's dims in memory order (rows and positions follow it)

    def value_at(self, node: fx.Node, idx: tuple) -> Value:
        key = (node, idx)
        if key not in self.memo:
            self.memo[key] = self._value_at(node, idx)
        return self.memo[key]

    def _value_at(self, node: fx.Node, idx: tuple) -> Value:
        if node in self.members:
            return self._apply_formula(node, idx)
        if is_view(node) and view_root(node) in self.members:
            return self.value_at(node.args[0], view_source_index(node, idx))
        val = meta(node)
        return load(self._slot(node), within(strided(idx, strides_of(val)), self.numel), val.dtype)

    def _slot(self, node: fx.Node) -> int:
        """The input slot of a tensor the kernel reads from memory."""
        slot = self.inputs.setdefault(node, len(self.inputs))
        if slot not in self.extents:
            val = meta(node)
            self.extents[slot] = max_offset(val) + 1
        return slot

    def read_at(self, node: fx.Node, coords: list) -> Value:
        """`node`'s element at `coords`: per dim an `Index`, or an int64 Value (a
        position computed in the kernel, already checked). The tensor is read from
        memory: a value computed in the kernel has no address."""
        if node in self.members or (is_view(node) and view_root(node) in self.members):
            raise NotFusible(f"{node.name} is read at computed positions but computed in the same kernel")
        val = meta(node)
        static, offset = Index.constant(0), None
        for coord, stride in zip(coords, strides_of(val)):
            if isinstance(coord, Value):
                term = coord if stride == 1 else coord * const(stride, torch.int64)
                offset = term if offset is None else offset + term
            else:
                static = static + coord * stride
        slot = self._slot(node)
        return load_where(slot, within(static, self.numel), self.extents[slot], offset, None, val.dtype)

    def masked(self, value: Value, live: Value | None) -> Value:
        """`value` with every read (and every position check) confined to the
        elements where `live` holds: elsewhere a read gives 0 and touches no
        memory. For a piece of a cat or a pad, whose reads elsewhere would
        leave the tensor."""
        if live is None:
            return value
        for v in walk([value]):
            if v.op in ("truncdiv", "fmod") and not v.dtype.is_floating_point:
                # on the masked-off zeros an integer division would raise
                raise NotFusible("integer division in a masked piece (cat/pad/scatter)")
        return self._mask(value, live)

    def _mask(self, v: Value, live: Value) -> Value:
        key = (v, live)
        if key in self._masked:
            return self._masked[key]
        if v.op == "load":
            slot, index = v.attr
            result = load_where(slot, index, self.extents[slot], None, live, v.dtype)
        elif v.op in ("load_where", "check_index"):
            args = tuple(self._mask(a, live) for a in v.args)
            result = Value(v.op, (args[0], args[1] & live), v.dtype, v.attr)
        elif not v.args:
            result = v
        else:
            result = Value(v.op, tuple(self._mask(a, live) for a in v.args), v.dtype, v.attr)
        self._masked[key] = result
        return result

    def _apply_formula(self, node: fx.Node, idx: tuple) -> Value:
        if node.target in REDUCTION_OPS:
            return self._apply_reduction(node, idx)
        opdef = POINTWISE_OPS[node.target]
        if opdef.compute == "indexing":
            result = INDEXING_LOWERINGS[node.target](self, node, idx)
            return cast(result, meta(node).dtype) if result.dtype != meta(node).dtype else result
        shape = shape_of(meta(node))
        compute = _compute_dtype(node, opdef)

        def convert(position, a):
            if not isinstance(a, fx.Node):
                return a
            if meta(a) is None:  # a symbolic size used as a number (x / x.numel())
                return _symbolic_scalar(a)
            if opdef.compute == "fill":
                return None  # full_like: only the shape of its argument matters
            v = self.value_at(a, _broadcast(idx, shape, shape_of(meta(a))))
            keep = compute is None or position in opdef.keep_args
            return v if keep else cast(v, compute)

        args = [convert(i, a) for i, a in enumerate(node.args)]
        kwargs = {k: convert(None, v) for k, v in node.kwargs.items()}
        if opdef.compute == "fill":
            kwargs["dtype"] = meta(node).dtype
        if opdef.wants_out:
            kwargs["out"] = meta(node)
        if opdef.coordinate is not None:
            kwargs["_coord"] = coordinate(idx[norm_dim(node.args[opdef.coordinate], len(shape))])
        result = opdef.formula(*args, **kwargs)
        if not isinstance(result, Value):
            raise NotFusible(f"{op_name(node.target)}: formula gave {type(result).__name__}")
        return cast(result, meta(node).dtype) if result.dtype != meta(node).dtype else result


    def _apply_reduction(self, node: fx.Node, idx: tuple) -> Value:
        """reduce(arg) at the output index: kept dims come from idx (they depend
        on the row only), reduced dims from r, the position along the row."""
        rdef = REDUCTION_OPS[node.target]
        dims, keepdim = reduction_signature(node)
        source = node.args[0]
        in_shape = shape_of(meta(source))
        if self.frame is None or (in_shape, tuple(dims)) != self.frame:
            raise NotFusible(f"{node.name} reduces another iteration space than its group")
        kept = [d for d in range(len(in_shape)) if d not in dims]
        kept_idx = [idx[d] for d in kept] if keepdim else list(idx)
        rows = frame_index(self.frame, [in_shape[d] for d in kept], self.walk)
        if not self._same_row(kept_idx, rows, in_shape):
            # a row's result read at another row (`A * x.sum(1)` broadcasts the sums
            # along A's rows): the kernel only has its own row's
            raise NotFusible(f"{node.name} is read at another row than the one it reduces")
        r_idx = reduced_index(in_shape, dims, self.walk)
        full, k, j = [], iter(kept_idx), iter(r_idx)
        for d in range(len(in_shape)):
            full.append(next(j) if d in dims else next(k))
        out_dtype = meta(node).dtype
        arg = self.value_at(source, tuple(full))
        if rdef.combine == "gather":
            return self._gather(node, idx, arg, coordinate(full[dims[0]]))
        if rdef.combine in ("argmax", "argmin"):
            return self._arg_reduction(rdef.combine, arg, in_shape, dims)
        if rdef.combine in ("any", "all"):
            arg = cast(arg, torch.bool)
        else:
            acc = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
            arg = cast(arg, acc)
        count = product(in_shape[d] for d in dims)  # may be symbolic: a constant from the size arguments
        if rdef.combine == "var":  # two passes: the mean, then the squared deviations
            correction = node.args[2] if len(node.args) > 2 else node.kwargs.get("correction", 1.0)
            mean = call("truediv", reduce("sum", arg), const(count, arg.dtype))
            dev = arg - mean
            result = call("truediv", reduce("sum", dev * dev), const(count - correction, arg.dtype))
        else:
            result = reduce(rdef.combine, arg)
        if rdef.mean:
            result = call("truediv", result, const(count, result.dtype))
        return cast(result, out_dtype)


    def _same_row(self, kept_idx, rows, in_shape) -> bool:
        """Whether the reduction is read, at every element of the kernel, at the row
        the kernel reduces there (the same index, or one that takes the same values)."""
        if all(a == b for a, b in zip(kept_idx, rows)):
            return True
        try:
            numel = int(hint(product(in_shape)))
            return all(same_on(a, b, numel) for a, b in zip(kept_idx, rows))
        except (TypeError, ValueError):  # a size without a hint: not provably the same row
            return False

    def _arg_reduction(self, kind: str, arg: Value, in_shape, dims) -> Value:
        """argmax/argmin: the row's extreme (NaN if the row holds one, as eager),
        then the smallest position holding it (a NaN matches NaN), so ties and
        NaN give eager's first index. Both are ordinary reductions of the row."""
        R = _static(product(in_shape[d] for d in dims), "the length of an arg-reduction")
        if arg.dtype in _LOW_PRECISION:
            arg = cast(arg, torch.float32)
        extreme = reduce("max" if kind == "argmax" else "min", arg)
        match = call("eq", arg, extreme)
        if arg.dtype.is_floating_point:
            match = match | (call("isnan", arg) & call("isnan", extreme))
        position = coordinate(Index.var().mod(R))
        return reduce("min", where(match, position, const(R, torch.int64)))

    def _gather(self, node: fx.Node, idx: tuple, arg: Value, position: Value) -> Value:
        """gather with one index per row. Each element-level input of the
        gathered expression is read at the target position (one load per row,
        see `_pick`), and the expression is evaluated once per row on the
        picked inputs. An index out of range is eager's error (`check_index`)."""
        out_dtype = meta(node).dtype
        acc = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
        in_shape, dims = self.frame
        R = _static(product(in_shape[d] for d in dims), "the length of a gathered row")
        target = check_index(cast(self.value_at(node.args[2], idx), torch.int64), R)
        # positions along the row fit in int32, so the per-element compare is 32-bit
        if R < 2**31:
            match = call("eq", cast(position, torch.int32), cast(target, torch.int32))
            at = cast(target, torch.int32)
        else:
            match = call("eq", position, target)
            at = target
        picked = _pick(arg, match, R, {}, at)
        return cast(cast(picked, acc), out_dtype)


def _pick(v: Value, match: Value, R: int, memo: dict, position: Value | None = None) -> Value:
    """v (an expression over a row) evaluated at the one position where
    `match` holds (`position`, when given): an element-level load becomes one
    read at that position per row (`load_at`); other element-level leaves are
    picked by masked sums; row-level values are kept. (A masked sum costs a
    compare, a select and an add per element: on an H200 it made a 8192x32000
    cross-entropy take 251 instead of 154 us.)"""
    if v in memo:
        return memo[v]
    if v.op == "load_where" and not is_row_index(v.attr[1], R):
        raise NotFusible("a gathered row read at computed positions")
    if v.op in ("load", "index"):
        index = v.attr[1] if v.op == "load" else v.attr
        if is_row_index(index, R):
            result = v
        elif v.op == "load" and position is not None:
            result = load_at(v.attr[0], index, position, v.dtype)
        elif v.dtype == torch.bool:
            result = reduce("any", match & v)
        else:
            acc = torch.float32 if v.dtype in _LOW_PRECISION else v.dtype
            acc = torch.int64 if not acc.is_floating_point else acc
            result = cast(reduce("sum", where(match, cast(v, acc), const(0, acc))), v.dtype)
    elif v.op in ("const", "reduce"):
        result = v
    else:
        result = Value(v.op, tuple(_pick(a, match, R, memo, position) for a in v.args), v.dtype, v.attr)
    memo[v] = result
    return result


def _typed(x):
    """What `torch.result_type` needs of an operand: its tensor, or a number of its type."""
    if not isinstance(x, fx.Node):
        return x
    val = x.meta.get("val")
    if isinstance(val, torch.SymInt):
        return 2
    if isinstance(val, torch.SymFloat):
        return 2.0
    return meta(x)


def _symbolic_scalar(node: fx.Node):
    """The size a graph node holds, as the formulas' Python number (a sympy expression)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.SymInt):
        raise NotFusible(f"{node.name} is not a tensor or a size ({type(val).__name__})")
    return as_size(val)


def _static(size, what: str):
    """`size` where it must be an int (a constant in the kernel's arithmetic)."""
    if is_symbolic(size):
        raise NotFusible(f"{what} is symbolic ({size}): not generated yet")
    return size


def memory_order(stride, dims) -> list:
    """`dims` from the outermost in memory to the innermost (largest stride first;
    a broadcast dim, stride 0, outermost: it moves nothing). Ties keep the logical
    order; symbolic strides are ordered by the sizes seen."""
    return sorted(dims, key=lambda d: -hint(stride[d]) if hint(stride[d]) != 0 else float("-inf"))


def frame_walk(group: FusionGroup) -> tuple | None:
    """The order in which a reduction group's kernel walks its frame's dims: the
    memory order of the tensor its first reduction reads, so that consecutive
    positions along a row (or consecutive rows) are adjacent in memory where that
    tensor allows it (a channels-last tensor reduced over C reads C contiguously)."""
    reductions = [n for n in group.nodes if n.target in REDUCTION_OPS]
    if group.frame is None or any(REDUCTION_OPS[n.target].combine in ("argmax", "argmin") for n in reductions):
        return None  # an arg-reduction's position along the row is its logical flat index
    source = reductions[0].args[0]
    in_shape, _ = group.frame
    return tuple(memory_order(strides_of(meta(source)), range(len(in_shape))))


def _digits(flat: Index, shape, dims, walk) -> dict:
    """dim -> its index at `flat`, walking `dims` in the order of `walk` (default: logical)."""
    order = [d for d in walk if d in dims] if walk is not None else list(dims)
    return dict(zip(order, delinearize(flat, [shape[d] for d in order])))


def reduced_index(in_shape, dims, walk=None) -> list:
    """Indices of the reduced dims (in increasing dim order) at r = x % R (R = their
    element count), r walking them in the order of `walk`."""
    r = Index.var().mod(product(in_shape[d] for d in dims))
    digits = _digits(r, in_shape, dims, walk)
    return [digits[d] for d in sorted(dims)]


def frame_index(frame, out_shape, walk=None) -> tuple:
    """Index of a reduction group's output at flat x = row * R + r: of one element
    (`out_shape` is the frame's shape) or of one row (the kept shape, with or
    without the reduced dims as 1). Rows walk the kept dims in the order of `walk`."""
    in_shape, dims = frame
    R = product(in_shape[d] for d in dims)
    kept = [d for d in range(len(in_shape)) if d not in dims]
    rows = _digits(Index.var().floordiv(R), in_shape, kept, walk)
    if tuple(out_shape) == tuple(in_shape):
        r = dict(zip(sorted(dims), reduced_index(in_shape, dims, walk)))
        return tuple(r[d] if d in dims else rows[d] for d in range(len(in_shape)))
    if tuple(out_shape) == tuple(in_shape[d] for d in kept):
        return tuple(rows[d] for d in kept)
    if tuple(out_shape) == tuple(1 if d in dims else in_shape[d] for d in range(len(in_shape))):
        return tuple(Index.constant(0) if d in dims else rows[d] for d in range(len(in_shape)))
    return tuple(delinearize(Index.var().floordiv(R), list(out_shape)))


def iteration_index(shape, stride) -> tuple:
    """Logical indices of flat x, walking `shape` in the memory order of `stride`."""
    # any walk is correct (stores go through the output's own strides)
    digits = _digits(Index.var(), shape, range(len(shape)), memory_order(stride, range(len(shape))))
    return tuple(digits[d] for d in range(len(shape)))


def lower_group(group: FusionGroup, name: str) -> tuple[KernelSpec, list[fx.Node], list[fx.Node]]:
    """The kernel for `group`, the graph nodes it reads (in slot order) and those it writes."""
    outputs = group_outputs(group)
    lowering = GroupLowering(group)
    first = meta(outputs[0])
    kernel_outputs = []
    for k, node in enumerate(outputs):
        val = meta(node)
        if group.frame is not None:
            idx = frame_index(group.frame, shape_of(val), lowering.walk)
        elif shape_of(val) == shape_of(first):
            idx = iteration_index(shape_of(first), strides_of(first))
        else:
            idx = iteration_index(shape_of(val), strides_of(val))
        value = lowering.value_at(node, idx)
        index = within(strided(idx, strides_of(val)), group.numel)
        kernel_outputs.append(KernelOutput(f"out{k}", val.dtype, index, value))
    # Tensors from outside that members read but the kernel never loads (full_like
    # of a member needs only its shape, not its inputs) are inputs all the same:
    # the group's unfused fallback computes every member from them.
    for node in group.nodes:
        for a in node.all_input_nodes:
            if a not in lowering.members and not (is_view(a) and view_root(a) in lowering.members) \
                    and isinstance(meta(a), torch.Tensor):
                lowering._slot(a)
    inputs = sorted(lowering.inputs, key=lowering.inputs.__getitem__)
    spec = KernelSpec(
        name=name,
        numel=group.numel,
        inputs=tuple(KernelInput(f"in{i}", meta(n).dtype) for i, n in enumerate(inputs)),
        outputs=tuple(kernel_outputs),
        description=", ".join(f"{n.name}={op_name(n.target)}" for n in group.nodes),
        reduction=group.reduction,
    )
    sizes = symbols_of(spec)
    return (replace(spec, sizes=sizes) if sizes else spec), inputs, outputs


def symbols_of(spec: KernelSpec) -> tuple[str, ...]:
    """The names of the symbolic sizes the kernel's arithmetic uses (sorted), after
    checking that the code generators can write each expression."""
    exprs = spec_size_exprs(spec)
    bad = [e for e in exprs if not renderable(e)]
    if bad:
        raise NotFusible(f"symbolic size {bad[0]} cannot be written as kernel arithmetic")
    return tuple(sorted(s.name for s in free_symbols(*exprs)))


def spec_size_exprs(spec: KernelSpec) -> list:
    """Every size in the kernel's arithmetic: numel, the row length, the indices'
    coefficients, divisors, moduli and offsets, and constants."""
    exprs = [spec.numel, spec.reduction]
    indices = [o.index for o in spec.outputs] \
        + [v.attr[1] for v in spec.values() if v.op in ("load", "load_at", "load_where")] \
        + [v.attr for v in spec.values() if v.op == "index"]
    while indices:
        index = indices.pop()
        exprs.append(index.const)
        for t in index.terms:
            exprs += [t.coef, t.div, t.mod]
            if t.base is not None:
                indices.append(t.base)
    for v in spec.values():
        if v.op == "const" and is_symbolic(v.attr):
            exprs.append(v.attr)
        elif v.op == "check_index":
            exprs.append(v.attr)
        elif v.op == "load_where":
            exprs.append(v.attr[2])
    return [e for e in exprs if e is not None]
