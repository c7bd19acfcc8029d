"""User operations in a captured aten graph.

Patterns speak of the operations a user wrote (``linear``, ``gelu``,
``layer_norm``), while a captured graph holds aten primitives: ``F.gelu`` may be
five pointwise nodes, ``nn.Linear`` a ``permute`` and an ``addmm``, a training
``softmax`` ``amax``/``sub``/``exp``/``sum``/``div``. A `Unit` is the set of
nodes that came from one user operation:

- forward graphs from Dynamo: nodes sharing a ``source_fn_stack`` entry;
- backward graphs: nodes sharing the autograd op (``original_aten`` + ``seq_nr``);
- other graphs (``make_fx``, hand-built): one node per unit, except that
  ``getitem`` joins its producer and a decomposed softmax / log_softmax
  (``amax → sub → exp → sum → div|log``) is recognised structurally.

Units know their canonical name, an `OpCategory` (pointwise, activation,
matmul, ...) and which units feed which. One aten node has an
`kitsune.ir.ops.OpKind` (`node_kind`); norm, softmax, attention, loss, ... are
categories of user operations, never node kinds.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import fx

from kitsune import _compat
from kitsune.ir.graph import is_view, user_op_key
from kitsune.ir.ops import OpKind, op_kind
from kitsune.sizes import hint, numel_of
from kitsune.planner import vocabulary as V


class OpCategory(str, Enum):
    """What a user operation does, as patterns and reports speak of it."""
    ATTENTION = "attention"
    VIEW = "view"              # no kernel: views, getitems
    ACTIVATION = "activation"
    QUANT = "quant"
    MATMUL = "matmul"
    CONV = "conv"
    LOSS = "loss"
    SOFTMAX = "softmax"
    NORM = "norm"
    DROPOUT = "dropout"
    BINARY = "binary"          # pointwise add/sub/mul/div/... (BINARY_OPS)
    POINTWISE = "pointwise"    # any other pointwise operation
    REDUCTION = "reduction"
    OTHER = "other"


# -- one node -------------------------------------------------------------------------

_MODULE_NAMES = {
    "Linear": "linear", "LazyLinear": "linear", "Bilinear": "bilinear", "ReLU": "relu", "ReLU6": "relu6",
    "GELU": "gelu", "SiLU": "silu", "Sigmoid": "sigmoid", "Tanh": "tanh", "LeakyReLU": "leaky_relu", "ELU": "elu",
    "SELU": "selu", "CELU": "celu", "Hardtanh": "hardtanh", "Hardswish": "hardswish",
    "Hardsigmoid": "hardsigmoid", "Softplus": "softplus", "Mish": "mish", "PReLU": "prelu", "GLU": "glu",
    "LogSigmoid": "logsigmoid", "Softmax": "softmax", "LogSoftmax": "log_softmax", "Softmin": "softmin",
    "Dropout": "dropout", "Dropout1d": "dropout", "Dropout2d": "dropout", "Dropout3d": "dropout",
    "LayerNorm": "layer_norm", "GroupNorm": "group_norm", "RMSNorm": "rms_norm", "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm", "BatchNorm3d": "batch_norm", "InstanceNorm1d": "instance_norm",
    "InstanceNorm2d": "instance_norm", "InstanceNorm3d": "instance_norm", "Conv1d": "conv1d",
    "Conv2d": "conv2d", "Conv3d": "conv3d", "ConvTranspose1d": "conv_transpose1d",
    "ConvTranspose2d": "conv_transpose2d", "ConvTranspose3d": "conv_transpose3d",
    "CrossEntropyLoss": "cross_entropy", "NLLLoss": "nll_loss", "MSELoss": "mse_loss",
    "MultiheadAttention": "multihead_attention", "Embedding": "embedding", "Flatten": "flatten",
    "Identity": "identity",
}
_FUNCTION_NAMES = {
    "truediv": "div", "div_": "div", "itruediv": "div", "floordiv": "floor_divide", "iadd": "add",
    "isub": "sub", "imul": "mul", "radd": "add", "rmul": "mul", "rsub": "rsub", "true_divide": "div",
    "multiply": "mul", "subtract": "sub", "divide": "div", "swish": "silu", "_softmax": "softmax",
    "_log_softmax": "log_softmax", "_safe_softmax": "softmax", "native_layer_norm": "layer_norm",
    "native_group_norm": "group_norm", "native_batch_norm": "batch_norm", "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm", "_native_batch_norm_legit_functional": "batch_norm",
    "_fused_rms_norm": "rms_norm", "native_dropout": "dropout", "nll_loss_forward": "nll_loss",
    "nll_loss2d_forward": "nll_loss", "convolution": "conv", "_convolution": "conv", "threshold_backward":
    "relu_backward", "_softmax_backward_data": "softmax_backward", "_log_softmax_backward_data":
    "log_softmax_backward", "native_layer_norm_backward": "layer_norm_backward", "getitem": "getitem",
}

MATMUL_TARGETS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "dot", "mv", "addmv", "linear",
                  "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu"}
CONV_TARGETS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d", "cudnn_convolution",
                "mkldnn_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
REDUCTION_TARGETS = {"sum", "mean", "amax", "amin", "max", "min", "var", "var_mean", "std", "std_mean", "prod",
                     "any", "all", "argmax", "argmin", "logsumexp", "norm", "linalg_vector_norm", "cumsum",
                     "cumprod", "xor_sum"}


def target_name(node: fx.Node) -> str:
    """Base op name of a call_function node: ``aten.add.Tensor`` -> ``add``."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, (_compat.OpOverload, _compat.OpOverloadPacket)):
        return _compat.op_name(target)
    return getattr(target, "__name__", str(target))


_VIEW_NAMES = frozenset({"broadcast_in_dim", "expand", "view", "reshape", "squeeze", "unsqueeze"})


def node_kind(node: fx.Node) -> OpKind:
    """The `OpKind` of one call_function node: the op table's kind, with matmuls,
    convolutions and reductions the table does not generate recognised by name.
    Every other node (inputs, outputs) is OPAQUE."""
    if node.op != "call_function":
        return OpKind.OPAQUE
    if node.target is operator.getitem or is_view(node):
        return OpKind.VIEW
    name = target_name(node)
    kind = op_kind(node.target)
    if kind is OpKind.POINTWISE:
        return kind
    if kind is OpKind.VIEW or name in _VIEW_NAMES:
        return OpKind.VIEW
    if kind is OpKind.REDUCTION or name in REDUCTION_TARGETS:
        return OpKind.REDUCTION
    if name in MATMUL_TARGETS:
        return OpKind.MATMUL
    if name in CONV_TARGETS:
        return OpKind.CONV
    return OpKind.OPAQUE


def tensor_vals(node) -> list:
    """The tensors a node produces (one, several for tuple results, none)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def is_kernel(node: fx.Node) -> bool:
    """Does eager PyTorch launch work for this node (not a view, not getitem)?"""
    return node.op == "call_function" and node_kind(node) is not OpKind.VIEW and bool(tensor_vals(node)) \
        and not getattr(node.target, "kitsune_free", False)  # a cached value (capture.fold), no launch


def nbytes(node) -> int:
    total = 0
    for v in tensor_vals(node):
        try:
            total += hint(numel_of(v)) * v.element_size()
        except Exception:  # noqa: BLE001 - symbolic/unbacked sizes: unknown, count nothing
            pass
    return total


def storage_bytes(node) -> int:
    """Bytes actually read when `node` is an input: a view reads at most its base."""
    size = nbytes(node)
    while isinstance(node, fx.Node) and node_kind(node) is OpKind.VIEW and node.args:
        base = node.args[0]
        if not isinstance(base, fx.Node):
            break
        size = min(size, nbytes(base)) if nbytes(base) else size
        node = base
    return size


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _source_name(target) -> str:
    if isinstance(target, type):
        return _MODULE_NAMES.get(target.__name__, _snake(target.__name__))
    if isinstance(target, str):
        name = target
    else:
        name = getattr(target, "__name__", None) or str(target)
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
    return _FUNCTION_NAMES.get(name, name)


def _aten_unit_name(name: str) -> str:
    return _FUNCTION_NAMES.get(name, name)


# -- units ----------------------------------------------------------------------------

@dataclass(eq=False)
class Unit:
    index: int
    name: str                                   # canonical name: "linear", "gelu", "add", "softmax", ...
    nodes: list = field(default_factory=list)   # fx nodes in graph order (views and getitems included)
    origin: str = "node"                        # "source" | "autograd" | "node" | "structural"
    inputs: list = field(default_factory=list)  # units feeding this one (direct)
    users: list = field(default_factory=list)   # units consuming this one (direct)

    # Cached: a unit is complete once UnitGraph is built (names may change while merging,
    # never after).
    @functools.cached_property
    def kernels(self) -> list:
        return [n for n in self.nodes if is_kernel(n)]

    @functools.cached_property
    def kinds(self) -> set:
        """The `OpKind`s of its kernel nodes."""
        return {node_kind(n) for n in self.kernels}

    def _opaque_named(self, names) -> bool:
        """Does it hold an opaque node (one the op table does not generate) named in `names`?"""
        return any(node_kind(n) is OpKind.OPAQUE and target_name(n) in names for n in self.kernels)

    @functools.cached_property
    def category(self) -> OpCategory:
        name, kinds = self.name, self.kinds
        if name in V.ATTENTION_OPS:
            return OpCategory.ATTENTION
        if not kinds:
            return OpCategory.VIEW
        if name in V.ACTIVATIONS and kinds <= {OpKind.POINTWISE, OpKind.OPAQUE} \
                and not self._opaque_named(V.NORM_OPS | V.SOFTMAX_OPS | V.ATTENTION_OPS):
            return OpCategory.ACTIVATION
        if name in V.QUANT_OPS:
            return OpCategory.QUANT
        if OpKind.MATMUL in kinds or name in V.MATMUL_OPS:
            return OpCategory.MATMUL
        if OpKind.CONV in kinds or name in V.CONV_OPS:
            return OpCategory.CONV
        if name in V.LOSS_OPS:
            return OpCategory.LOSS
        if name in V.SOFTMAX_OPS or self._opaque_named(V.SOFTMAX_OPS):
            return OpCategory.SOFTMAX
        if name in V.NORM_OPS or self._opaque_named(V.NORM_OPS):
            return OpCategory.NORM
        if name == "dropout":
            return OpCategory.DROPOUT
        if kinds == {OpKind.POINTWISE}:
            return OpCategory.BINARY if name in V.BINARY_OPS else OpCategory.POINTWISE
        if OpKind.REDUCTION in kinds:
            return OpCategory.REDUCTION
        return OpCategory.OTHER

    @functools.cached_property
    def pointwise(self) -> bool:
        """Are all its kernels pointwise (whatever its category: an activation, a cast, ...)?"""
        return self.kinds == {OpKind.POINTWISE}

    def matches(self, op: str) -> bool:
        """Does this unit answer to the (canonical) pattern op name?"""
        name, category = self.name, self.category
        if op == name or op == V.canonical_op(name):
            return True
        if op == "activation":
            return category is OpCategory.ACTIVATION
        if op in ("elementwise", "pointwise"):
            return self.pointwise
        if op == "matmul":
            return category is OpCategory.MATMUL and name != "linear" or name in ("mm", "bmm", "matmul")
        if op == "linear":
            return name in ("linear", "addmm")
        if op == "conv":
            return category is OpCategory.CONV
        if op == "dequantize":
            return category is OpCategory.QUANT or name in ("dequantize",)
        if op in ("scale", "bias", "mask"):
            return self.pointwise
        return any(target_name(n) == op for n in self.kernels)

    def output_nodes(self) -> list:
        """Nodes of this unit whose value is used outside it."""
        members = set(self.nodes)
        return [n for n in self.nodes if any(u not in members for u in n.users) and tensor_vals(n)]

    def input_nodes(self) -> list:
        """Tensor-valued nodes outside this unit that it reads."""
        members, seen = set(self.nodes), {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in members and tensor_vals(a):
                    seen[a] = None
        return list(seen)

    def label(self) -> str:
        return self.name

    def __repr__(self):
        return f"Unit({self.name}: {[n.name for n in self.nodes]})"


def _through_views(start: list, step) -> list[Unit]:
    """The non-view units reached from `start` by `step` (users or inputs),
    walking through view-only units, breadth first."""
    out, stack, seen = [], list(start), set()
    while stack:
        u = stack.pop(0)
        if u.index in seen:
            continue
        seen.add(u.index)
        if u.category is OpCategory.VIEW:
            stack.extend(step(u))
        else:
            out.append(u)
    return out


class UnitGraph:
    """The user operations of one fx graph, in graph order."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.units: list[Unit] = []
        self.unit_of: dict[fx.Node, Unit] = {}
        self._build()

    def _build(self) -> None:
        by_key: dict = {}
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                    and node.args[0] in self.unit_of:
                unit = self.unit_of[node.args[0]]
                unit.nodes.append(node)
                self.unit_of[node] = unit
                continue
            key = user_op_key(node)
            unit = by_key.get(key)
            if unit is None:
                origin, name = self._name(node, key)
                unit = Unit(index=len(self.units), name=name, origin=origin)
                by_key[key] = unit
                self.units.append(unit)
            unit.nodes.append(node)
            self.unit_of[node] = unit
        self._merge_structural()
        self._link()

    @staticmethod
    def _name(node: fx.Node, key) -> tuple[str, str]:
        if key[0] == "source":
            stack = node.meta.get("source_fn_stack") or []
            target = stack[-1][1] if stack and len(stack[-1]) > 1 else key[1]
            return "source", _source_name(target)
        if key[0] == "autograd":
            original = str(key[1])  # e.g. "aten.gelu_backward.default"
            parts = original.split(".")
            base = parts[1] if len(parts) > 1 and parts[0] in ("aten", "prims") else parts[0]
            return "autograd", _aten_unit_name(base)
        return "node", _aten_unit_name(target_name(node))

    def _merge_structural(self) -> None:
        """Recognise decomposed softmax/log_softmax among one-node units."""
        def single(node, *names):
            unit = self.unit_of.get(node)
            if unit is None or unit.origin != "node" or target_name(node) not in names:
                return None
            return unit

        merged = False
        for unit in list(self.units):
            if unit.origin != "node" or len(unit.nodes) != 1 or target_name(unit.nodes[0]) not in ("amax", "max"):
                continue
            amax = unit.nodes[0]
            x = amax.args[0] if amax.args else None
            chain = [amax]
            sub = next((u for u in amax.users if single(u, "sub") and u.args[0] is x), None)
            exp = next((u for u in sub.users if single(u, "exp")), None) if sub is not None else None
            total = next((u for u in exp.users if single(u, "sum")), None) if exp is not None else None
            if total is None:
                continue
            chain += [sub, exp, total]
            div = next((u for u in exp.users if single(u, "div") and u.args[1] is total), None)
            name = "softmax"
            if div is not None:
                chain.append(div)
            else:
                log = next((u for u in total.users if single(u, "log")), None)
                out = next((u for u in sub.users if single(u, "sub") and log is not None and u.args[1] is log), None)
                if log is None or out is None:
                    continue
                chain += [log, out]
                name = "log_softmax"
            head = self.unit_of[amax]
            head.name, head.origin = name, "structural"
            for node in chain[1:]:
                other = self.unit_of[node]
                head.nodes.extend(other.nodes)
                for n in other.nodes:
                    self.unit_of[n] = head
                other.nodes = []
                merged = True
            order = {n: i for i, n in enumerate(self.graph.nodes)}
            head.nodes.sort(key=order.__getitem__)
        if merged:
            self.units = [u for u in self.units if u.nodes]
            for i, u in enumerate(self.units):
                u.index = i

    def _link(self) -> None:
        for unit in self.units:
            ins = []
            for n in unit.nodes:
                for a in n.all_input_nodes:
                    src = self.unit_of.get(a)
                    if src is not None and src is not unit and src not in ins:
                        ins.append(src)
            unit.inputs = ins
            for src in ins:
                src.users.append(unit)

    # -- traversal helpers used by the pattern matcher -------------------------

    def consumers(self, unit: Unit) -> list[Unit]:
        """Units reading `unit`'s result, looking through view-only units."""
        return _through_views(unit.users, lambda u: u.users)

    def producers(self, unit: Unit) -> list[Unit]:
        """Units whose results `unit` reads, looking through view-only units."""
        return _through_views(unit.inputs, lambda u: u.inputs)

    def views_between(self, a: Unit, b: Unit) -> list[Unit]:
        """View-only units on the path from a to b (so opportunities hold them too)."""
        found = []
        for v in b.inputs:
            if v.category is OpCategory.VIEW and a in self._view_sources(v):
                found.append(v)
                found.extend(self.views_between(a, v))
        return found

    def _view_sources(self, unit: Unit) -> list[Unit]:
        out = []
        for u in unit.inputs:
            out.extend(self._view_sources(u) if u.category is OpCategory.VIEW else [u])
        return out
