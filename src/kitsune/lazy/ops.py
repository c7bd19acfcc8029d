"""Which aten ops a lazy region records, and how.

The set is Kitsune's own: the op table (`kitsune.ir.ops`: pointwise ops,
casts, reductions, views) is what the compiler can fuse. Composite ops that
PyTorch decomposes into table ops (gelu, softmax, lerp, addcmul, var, ...:
`kitsune.capture.dynamo.decomposition_table`, the table torch.compile's graphs
are decomposed with) are recorded as their decomposition. An in-place op is
recorded as its functional form and a write-back. Anything else is a sync point.
"""
from __future__ import annotations

import torch

from kitsune import _compat

from kitsune.ir.ops import POINTWISE_OPS, REDUCTION_OPS, VIEW_OPS
from kitsune.planner import vocabulary

aten = torch.ops.aten

RECORD, VIEW, DECOMPOSE, INPLACE, EAGER = "record", "view", "decompose", "inplace", "eager"

# Composite operations worth recording through their decomposition: the user
# operations the planner knows by name (kitsune.planner.vocabulary), plus the
# pointwise composites optimizers are written with.
_DECOMPOSED_NAMES = (vocabulary.ACTIVATIONS | vocabulary.BINARY_OPS | vocabulary.SOFTMAX_OPS
                     | vocabulary.NORM_OPS | vocabulary.REDUCTION_OPS
                     | {"lerp", "addcmul", "addcdiv", "square", "xlogy", "logit", "clamp", "where",
                        "masked_fill", "std", "var_mean", "std_mean", "mean", "sum", "linalg_vector_norm"})
# never recorded: they read the random generator, or move elements at data-dependent places
_NEVER = {"dropout", "native_dropout", "bernoulli", "rand", "rand_like", "randn_like", "rrelu", "cumsum",
          "cumprod", "argmax", "argmin"}
# ops whose result is a fresh tensor however it is spelled (no inputs): cheap, run eagerly
_FILL = {"full", "scalar_tensor", "arange", "full_like"}

# Composites whose decomposition (torch._refs) uses its float arguments only as operands of
# tensor arithmetic, with no Python branch on their value: a float that follows the argument
# in two traces follows it always (kitsune.lazy.macro.generalize). Others are traced again
# whenever a float they computed a constant from changes.
FLOATS_PASSED_THROUGH = frozenset({aten.addcdiv.default, aten.addcmul.default, aten.lerp.Scalar})

_ACTIONS: dict = {}
_FUNCTIONAL: dict = {}
_SCALAR_POSITIONS: dict = {}
_DECOMPOSITIONS: dict | None = None


def decompositions() -> dict:
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS is None:
        from kitsune.capture.dynamo import decomposition_table
        _DECOMPOSITIONS = decomposition_table(reductions=True)
    return _DECOMPOSITIONS


def base_name(op) -> str:
    return _compat.op_schema(op).name.split("::")[-1]


def action(op) -> str:
    """How the lazy region treats `op` (cached per op)."""
    found = _ACTIONS.get(op)
    if found is None:
        found = _ACTIONS[op] = _classify(op)
    return found


# id(op) -> (op, action): the recording path's lookup. An OpOverload hashes in Python
# (a frame per lookup); its id does not. The entry holds the op, so the id stays its own.
_BY_ID: dict = {}


def action_by_id(op) -> str:
    """`action(op)`, found by the op's identity (for the per-op path)."""
    found = _BY_ID.get(id(op))
    if found is None or found[0] is not op:
        found = _BY_ID[id(op)] = (op, action(op))
    return found[1]


def _classify(op) -> str:
    if not isinstance(op, _compat.OpOverload) or torch.Tag.nondeterministic_seeded in op.tags:
        return EAGER
    name = base_name(op)
    if name.rstrip("_") in _NEVER or name in _FILL:
        return EAGER
    if _compat.op_schema(op).is_mutable:
        return INPLACE if functional_of(op) is not None else EAGER
    returns = [str(r.type) for r in _compat.op_schema(op).returns]
    if returns and all(r == "Tensor" for r in returns) and len(returns) > 1:
        # several results (native_layer_norm, var_mean): only as a decomposition
        return DECOMPOSE if name in _DECOMPOSED_NAMES and op in decompositions() else EAGER
    if returns != ["Tensor"]:
        return EAGER
    if op in VIEW_OPS:
        return VIEW
    if op in POINTWISE_OPS or op in REDUCTION_OPS:
        return RECORD
    if name in _DECOMPOSED_NAMES and op in decompositions():
        return DECOMPOSE
    return EAGER


_WRITTEN: dict = {}   # id(op) -> (op, ((position, name), ...))


def written_arguments(op) -> tuple:
    """(cached) (position, name) of each argument `op` writes (its schema's alias
    annotations); empty for a functional op."""
    found = _WRITTEN.get(id(op))
    if found is None or found[0] is not op:
        schema = _compat.op_schema(op)
        written = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                        if a.alias_info is not None and a.alias_info.is_write) if schema.is_mutable else ()
        found = _WRITTEN[id(op)] = (op, written)
    return found[1]


def functional_of(op):
    """(cached) The functional overload of an in-place op that writes only its first
    argument (`add_.Tensor` -> `add.Tensor`), or None."""
    if op not in _FUNCTIONAL:
        _FUNCTIONAL[op] = _functional_of(op)
    return _FUNCTIONAL[op]


def _functional_of(op):
    schema = _compat.op_schema(op)
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if len(written) != 1 or written[0] is not schema.arguments[0] or len(schema.returns) != 1:
        return None
    if any(a.kwarg_only and a.name == "out" for a in schema.arguments):
        return None
    name = base_name(op)
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    functional = getattr(packet, op._overloadname, None) if packet is not None else None
    if functional is None or action(functional) == EAGER or _compat.op_schema(functional).is_mutable:
        return None
    return functional


# Arithmetic that promotes its operands: a 0-dim float64 tensor in place of a Python float
# gives the same float32/float64 result (prims ops and others want exact dtypes).
_LIFTING_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Tensor}


def scalar_positions(op) -> frozenset:
    """(cached) Positions of `Tensor` arguments of the arithmetic ops where a Python float
    may stand in for a tensor and can be lifted into a graph input without changing the
    result's dtype."""
    found = _SCALAR_POSITIONS.get(op)
    if found is None:
        found = _SCALAR_POSITIONS[op] = frozenset(
            i for i, a in enumerate(_compat.op_schema(op).arguments) if str(a.type) == "Tensor") \
            if op in _LIFTING_OPS else frozenset()
    return found
