"""Matrix chains (spec 04's `MatrixChain`): a product of three or more
matrices, computed in the order with the fewest FLOPs.

`(A @ B) @ v` with a vector `v` costs a matrix-matrix product (2·m·k·n FLOPs)
and a matrix-vector one; `A @ (B @ v)` costs two matrix-vector products
(2·k·n + 2·m·k). The program as written fixes the order; the sizes decide
which one pays. A backward graph writes such chains itself: the input
gradient of `x @ W1 @ W2` is `x.T @ (g @ W2.T)`, and with a narrow `W2`
`(x.T @ g) @ W2.T` is cheaper.

The pass works on the aten graph after AOTAutograd (what `kitsune.compiler`
compiles), before planning:

- a chain is a tree of `mm` (or of `bmm`) whose every inner product has one
  user, the next product, possibly through views that give back the same shape
  (`torch.matmul`'s reshapes of 3-D operands, the unsqueeze/squeeze around a
  vector on the left, the expand/view around `bmm`). Those views change no
  element's place, so the product they carry is an operand as it is. A product
  with another user (a graph output, a tensor saved for the backward) ends the
  chain: it is computed anyway, and re-associating would compute more.
- the chain's last product may be an `addmm` (its bias is added to the product
  whichever order computed it) or a matrix-vector product, which AOTAutograd
  decomposes to `sum(mul(P, v), [1])`; an `addmm` inside a chain is not a
  product of its operands and ends it. Re-associated, the vector stays a
  vector: each product with it is that same `mul` + `sum`.
- the order with the fewest FLOPs comes from the classic O(n³) dynamic
  program on the sizes seen at capture (`sizes.hint`). The chain is rebuilt
  only where that saves at least a quarter of the FLOPs there and, with
  symbolic sizes, only where the new order costs no more than the old one
  for every size the symbols can take (a graph compiled for dynamic shapes
  serves the next sizes too, and must never get slower for them).
- integer products keep the order written.

Re-association changes the rounding (bf16 rounds every intermediate product):
the result is within matmul tolerances, not bit-equal to eager's. The final
node's value (shape, strides, dtype) is checked on fake tensors before the
graph changes; any doubt leaves the chain as written, with the reason in its
`Rewrite`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from kitsune.capture.rewrites import NodeBuilder, Rewrite
from kitsune.sizes import hint, is_symbolic, shape_of, strides_of

log = logging.getLogger("kitsune")

aten = torch.ops.aten

MIN_SAVING = 0.25  # re-associate only when it saves at least this share of the chain's FLOPs

_PRODUCTS = {aten.mm.default: "mm", aten.bmm.default: "bmm"}

# Views that keep every element's place in row-major order: a product seen
# through a run of them that ends in its own shape is the product itself.
_SAME_DATA = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
              aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
              aten.alias.default}


@dataclass
class _Chain:
    """A tree of products found at `root` (the node whose value it computes)."""

    root: fx.Node
    kind: str                                    # "mm" or "bmm": the op of its products
    top: tuple                                   # the root's form: ("mm",), ("bmm",), ("mv",), ("addmm", bias, kwargs)
    operands: list = field(default_factory=list)  # the leaves, left to right
    nodes: list = field(default_factory=list)     # what a rebuilt chain replaces
    blocked: list = field(default_factory=list)   # products that would extend it but have other users
    tree: object = None                           # the order written: an operand index or (left, right)

    @property
    def vector(self) -> bool:
        """Is the last operand a vector (the root a matrix-vector product)?"""
        return self.top[0] == "mv"


def reassociate_matmul_chains(gm: fx.GraphModule) -> list[Rewrite]:
    """Rebuild every chain of matmuls in `gm` (in place) in its cheapest order
    where that pays; one `Rewrite` per chain looked at, applied or not."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"reassociate_matmul_chains: gm must be a torch.fx.GraphModule, not {type(gm).__name__}")
    rewrites, seen = [], set()
    for node in reversed(list(gm.graph.nodes)):  # a chain is found at its last product first
        if node in seen:
            continue
        try:
            chain = _chain_at(node)
        except Exception as error:  # noqa: BLE001 - a pass that cannot read a node leaves it alone
            log.debug("matrix chain at %s not read: %s: %s", node.name, type(error).__name__, error)
            continue
        if chain is None or (len(chain.operands) < 3 and not chain.blocked):
            continue
        seen.update(chain.nodes)
        try:
            rewrites.append(_review(gm, chain))
        except Exception as error:  # noqa: BLE001 - never crash the compile: the chain stays as written
            log.warning("matrix chain at %s left as written: %s: %s", node.name, type(error).__name__, error)
            rewrites.append(Rewrite("matrix_chain", ("matmul",) * (len(chain.operands) - 1),
                                    tuple(n.name for n in chain.nodes), choice="kept as written",
                                    applied=False, reason=f"{type(error).__name__}: {error}"))
    if any(r.applied for r in rewrites):
        gm.graph.lint()
        gm.recompile()
    return rewrites


# -- finding chains -----------------------------------------------------------------------


def _chain_at(root: fx.Node) -> _Chain | None:
    """The chain whose last product is `root`, or None where root is no product."""
    form = _root_form(root)
    if form is None:
        return None
    kind, top, left, right, extra = form
    chain = _Chain(root, kind, top, nodes=[root, *extra])
    left_tree = _side(chain, left)
    right_tree = _leaf(chain, right) if chain.vector else _side(chain, right)
    chain.tree = (left_tree, right_tree)
    return chain


def _root_form(node: fx.Node):
    """(kind, top, left, right, other nodes) of a node that can end a chain, else None."""
    if node.op != "call_function":
        return None
    if node.target in _PRODUCTS and len(node.args) == 2:
        kind = _PRODUCTS[node.target]
        return kind, (kind,), node.args[0], node.args[1], []
    if node.target is aten.addmm.default and len(node.args) == 3:
        return "mm", ("addmm", node.args[0], dict(node.kwargs)), node.args[1], node.args[2], []
    found = _matrix_vector(node)
    if found is not None:
        matrix, vector, mul = found
        return "mm", ("mv",), matrix, vector, [mul]
    return None


def _matrix_vector(node: fx.Node):
    """(matrix, vector, mul) where node is `sum(mul(matrix, vector), [1])` with a
    2-D matrix and a 1-D vector of one dtype: AOTAutograd's `mv`."""
    if node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
        return None
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    mul = node.args[0]
    if keepdim or list(node.args[1]) not in ([1], [-1]) or not _is_call(mul, {aten.mul.Tensor}):
        return None
    if len(mul.args) != 2 or not _sole_use(mul, node):
        return None
    for matrix, vector in (mul.args, reversed(mul.args)):
        m, v = _val(matrix), _val(vector)
        if m is None or v is None or m.dim() != 2 or v.dim() != 1 or m.dtype != v.dtype:
            continue
        if shape_of(m)[1] == shape_of(v)[0]:
            return matrix, vector, mul
    return None


def _side(chain: _Chain, arg) -> object:
    """The subtree of one operand of a product: the product behind it (through
    same-data views) when it is used only there, else a leaf."""
    product, links = _product_behind(arg, chain.kind)
    if product is None:
        return _leaf(chain, arg)
    if not all(_single_user(node) for node in (product, *links)):  # each read once, by the next
        chain.blocked.append(product)
        return _leaf(chain, arg)
    chain.nodes.extend([*links, product])
    left = _side(chain, product.args[0])
    right = _side(chain, product.args[1])
    return (left, right)


def _product_behind(arg, kind: str):
    """(product, views from arg back to it) where arg is a product of `kind`
    seen through views that end in its own shape; (None, []) otherwise."""
    links, node = [], arg
    while _is_call(node, _SAME_DATA):
        links.append(node)
        node = node.args[0]
    if not _is_call(node, _PRODUCTS) or _PRODUCTS[node.target] != kind or len(node.args) != 2:
        return None, []
    start, end = _val(node), _val(arg)
    if start is None or end is None or start.dtype != end.dtype or shape_of(start) != shape_of(end):
        return None, []
    return node, links


def _leaf(chain: _Chain, arg) -> int:
    chain.operands.append(arg)
    return len(chain.operands) - 1


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _single_user(node: fx.Node) -> bool:
    """Used by exactly one node, once (mm(p, p) squares p: it is no chain link)."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return _sole_use(node, user)


def _sole_use(node: fx.Node, user: fx.Node) -> bool:
    """Is `user` node's only user, and does it read node once?"""
    if set(node.users) != {user}:
        return False
    reads = []
    fx.node.map_arg((user.args, user.kwargs), lambda a: reads.append(a) if a is node else None)
    return len(reads) == 1


def _val(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


# -- choosing the order ---------------------------------------------------------------------


def _review(gm: fx.GraphModule, chain: _Chain) -> Rewrite:
    """Decide on one chain, rebuild it where it pays, and say so."""
    rewrite = Rewrite("matrix_chain", ("matmul",) * (len(chain.operands) - 1),
                      tuple(node.name for node in chain.nodes), applied=False)
    if len(chain.operands) < 3:
        product = chain.blocked[0]
        rewrite.nodes = (product.name, *rewrite.nodes)
        rewrite.ops = ("matmul", "matmul")
        rewrite.choice = "kept as written"
        rewrite.reason = (f"the product {product.name} is read elsewhere too (a graph output, saved for "
                          "the backward, or read twice): it is computed anyway")
        return rewrite
    written = _text(chain.tree, chain)
    rewrite.choice = f"kept {written}"
    val, sizes = _val(chain.root), _dims(chain)
    if val is None or sizes is None:
        rewrite.reason = "the operands' sizes are not known"
    elif not (val.dtype.is_floating_point or val.dtype.is_complex):
        rewrite.reason = f"{val.dtype} matmuls keep the order written"
    else:
        dims, batch = sizes
        best = _cheapest_order([hint(d) for d in dims])
        old, new = _flops(chain.tree, dims, batch), _flops(best, dims, batch)
        seen = " at the sizes seen" if is_symbolic(old) or is_symbolic(new) else ""
        summary = f"{_flop_text(hint(old))} → {_flop_text(hint(new))}{seen}"
        if hint(old) == 0 or hint(new) > (1 - MIN_SAVING) * hint(old):
            rewrite.reason = f"the cheapest order saves less than {MIN_SAVING:.0%} ({summary})"
        elif not _never_worse(old, new):
            rewrite.reason = f"the new order may cost more for other values of the symbolic sizes ({summary})"
        else:
            made, failure = _rebuild(gm, chain, best)
            if failure:
                rewrite.reason = failure
            else:
                rewrite.applied, rewrite.nodes = True, tuple(node.name for node in made)
                rewrite.choice = f"re-associated {written} to {_text(best, chain)}: {summary}"
                log.info("matrix chain at %s: %s", chain.root.name, rewrite.choice)
    if not rewrite.applied:
        log.debug("matrix chain at %s %s: %s", chain.root.name, rewrite.choice, rewrite.reason)
    return rewrite


def _dims(chain: _Chain):
    """(p, batch): operand i is p[i] × p[i+1] (a vector is k × 1), every one
    of the batch size for `bmm`; None where a size is missing or the sizes
    do not match as expressions."""
    vals = [_val(op) for op in chain.operands]
    if any(v is None for v in vals):
        return None
    rank = 3 if chain.kind == "bmm" else 2
    shapes = [shape_of(v) for v in vals]
    if chain.vector:
        shapes[-1] = (*shapes[-1], 1)
    if any(len(shape) != rank for shape in shapes):
        return None
    batch = shapes[0][0] if rank == 3 else 1
    dims = [shapes[0][-2]]
    for shape in shapes:
        if shape[-2] != dims[-1] or (rank == 3 and shape[0] != batch):
            return None
        dims.append(shape[-1])
    return dims, batch


def _cheapest_order(dims: list) -> object:
    """The classic O(n³) dynamic program: the tree over operands 0..n-1
    (operand i is dims[i] × dims[i+1]) with the fewest multiply-adds."""
    n = len(dims) - 1
    if n < 1:
        raise ValueError(f"_cheapest_order: dims must hold the sizes of at least one operand, got {dims}")
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            cost[i][j] = None
            for k in range(i, j):
                c = cost[i][k] + cost[k + 1][j] + dims[i] * dims[k + 1] * dims[j + 1]
                if cost[i][j] is None or c < cost[i][j]:
                    cost[i][j], split[i][j] = c, k

    def tree(i, j):
        return i if i == j else (tree(i, split[i][j]), tree(split[i][j] + 1, j))
    return tree(0, n - 1)


def _flops(tree, dims: list, batch):
    """FLOPs (2 per multiply-add) of computing `tree`: an int, or sympy of symbolic sizes."""
    def walk(t):
        if isinstance(t, int):
            return 0, t, t
        left, i, k = walk(t[0])
        right, _, j = walk(t[1])
        return left + right + 2 * batch * dims[i] * dims[k + 1] * dims[j + 1], i, j
    total = walk(tree)[0]
    return sympy.expand(total) if isinstance(total, sympy.Basic) else total


def _never_worse(old, new) -> bool:
    """Does new ≤ old hold for every size? Symbols are sizes
    of at least 2 (`kitsune.sizes`): with each s written t + 2 (t ≥ 0), a
    polynomial whose coefficients are all non-negative is non-negative. A
    sufficient test, so "no" may mean "not known"."""
    gap = sympy.expand(old - new)
    if not gap.free_symbols:
        return bool(gap >= 0)
    symbols = sorted(gap.free_symbols, key=str)
    shifted = sympy.expand(gap.xreplace({s: s + 2 for s in symbols}))
    try:
        coefficients = sympy.Poly(shifted, *symbols).coeffs()
    except (sympy.PolynomialError, sympy.GeneratorsNeeded, TypeError, ValueError):
        return False  # FloorDiv or Mod in a size: not a polynomial
    return all(c >= 0 for c in coefficients)


def _text(tree, chain: _Chain) -> str:
    """The order as text, operands named A, B, C, ... (v for a vector)."""
    last = len(chain.operands) - 1

    def name(i):
        if chain.vector and i == last:
            return "v"
        return chr(ord("A") + i) if i < 26 else f"M{i}"

    def walk(t, outer):
        if isinstance(t, int):
            return name(t)
        inner = f"{walk(t[0], False)}@{walk(t[1], False)}"
        return inner if outer else f"({inner})"
    return walk(tree, True)


def _flop_text(flops) -> str:
    value = float(flops)
    for unit in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or unit == "T":
            return f"{value:.3g} {unit}FLOP"
        value /= 1000
    raise AssertionError("unreachable")


# -- rebuilding -----------------------------------------------------------------------------


def _rebuild(gm: fx.GraphModule, chain: _Chain, tree) -> tuple[list, str | None]:
    """Compute the chain in the order `tree` in place of its nodes: returns
    (the nodes made, None), or ([], why not) leaving the graph as it was."""
    emitter = NodeBuilder(gm.graph, chain.root)
    try:
        new_root = _emit_root(emitter, chain, tree)
    except Exception as error:  # noqa: BLE001 - the chain stays as written
        emitter.undo()
        return [], f"the new order does not trace: {type(error).__name__}: {error}"
    old, new = _val(chain.root), _val(new_root)
    if new is None or (new.dtype, new.device) != (old.dtype, old.device) or \
            shape_of(new) != shape_of(old) or strides_of(new) != strides_of(old):
        emitter.undo()
        return [], "the new order gives the result another shape, layout or dtype"
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in chain.root.meta:
            new_root.meta[key] = chain.root.meta[key]
    chain.root.replace_all_uses_with(new_root)
    pending = list(chain.nodes)
    while pending:  # erase users before what they read
        dead = [node for node in pending if not node.users]
        if not dead:
            raise AssertionError(f"matrix chain nodes still in use: {[n.name for n in pending]}")
        for node in dead:
            gm.graph.erase_node(node)
            pending.remove(node)
    return emitter.made, None


def _emit_root(emitter: NodeBuilder, chain: _Chain, tree) -> fx.Node:
    """The nodes computing `tree` (a pair), its last product in the root's form."""
    left = _emit(emitter, chain, tree[0])
    if chain.vector:  # AOTAutograd's matrix-vector product, as the graph had it
        last = len(chain.operands) - 1
        if tree[1] == last:
            right = chain.operands[last]
        else:
            right = emitter(aten.squeeze.dim, _emit(emitter, chain, tree[1]), 1)
        product = emitter(aten.mul.Tensor, left, right)
        return emitter(aten.sum.dim_IntList, product, [1])
    right = _emit(emitter, chain, tree[1])
    if chain.top[0] == "addmm":
        _, bias, kwargs = chain.top
        return emitter(aten.addmm.default, bias, left, right, **kwargs)
    return emitter(aten.bmm.default if chain.kind == "bmm" else aten.mm.default, left, right)


def _emit(emitter: NodeBuilder, chain: _Chain, tree) -> fx.Node:
    """The nodes computing an inner `tree` (an operand index or a pair). A
    vector inside is a column (k × 1) and its products are `mm`: as
    `sum(mul(B, v), [1])`, the planner would fuse a row reduction with the
    product that reads it along a row, which its kernels compute wrongly
    where the two shapes coincide (A, B square)."""
    if isinstance(tree, int):
        node = chain.operands[tree]
        if chain.vector and tree == len(chain.operands) - 1:
            return emitter(aten.unsqueeze.default, node, 1)
        return node
    left = _emit(emitter, chain, tree[0])
    right = _emit(emitter, chain, tree[1])
    return emitter(aten.bmm.default if chain.kind == "bmm" else aten.mm.default, left, right)
