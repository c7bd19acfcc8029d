"""Kernel names that say what a kernel is: `kitsune_<kind>_<structure>`.

The kind comes from the group's content: the user operation a reduction
group implements (``softmax``, ``log_softmax``, ``layer_norm``,
``rms_norm``, ``cross_entropy``, their ``_backward``), else ``reduction``
or ``pointwise``. The structure part is the first 8 hex digits of the
lowered kernel's structure hash, so identical groups (a transformer's
layers) share one generated function and its cache files.

One name is used in the compiled graph (`FusedGroupCall.__name__`), the
stats and the report; within one graph it is unique: a repeat of an
identical group gets fx's suffix (``kitsune_softmax_1a2b3c4d_1``) and runs
the same generated function, whose name (`function_name`) leaves the
suffix out.
"""
from __future__ import annotations

from kitsune.planner.detect import user_op_name
from kitsune.planner.plan import FusionGroup
from kitsune.planner.vocabulary import LOSS_OPS, NORM_OPS, SOFTMAX_OPS, canonical_op

# Reduction kernels named after the user operation they implement, in the units'
# vocabulary; a loss holds a softmax, so losses rank first, then softmaxes, then norms.
NAMED_KINDS = (LOSS_OPS, SOFTMAX_OPS, NORM_OPS)
_HASH = 8  # hex digits of the structure hash in a name


def kernel_kind(group: FusionGroup) -> str:
    """What the group's kernel computes, in one word."""
    if group.frame is None:
        return "pointwise"
    ranked = []
    for position, node in enumerate(group.nodes):
        try:
            name = user_op_name(node)
        except Exception:  # noqa: BLE001 - a name is never worth a failed compile
            continue
        base = canonical_op(name.removesuffix("_backward"))
        rank = next((i for i, ops in enumerate(NAMED_KINDS) if base in ops), None)
        if rank is not None:
            ranked.append((rank, position, base + name[len(name.removesuffix("_backward")):]))
    return min(ranked)[2] if ranked else "reduction"


def kernel_name(kind: str, spec, taken: set) -> str:
    """`kitsune_<kind>_<structure hash>`, suffixed `_<n>` when `taken` (this graph's
    names so far) has it; the name is added to `taken`."""
    base = f"kitsune_{kind}_{spec.structure_key()[:_HASH]}"
    name, repeat = base, 0
    while name in taken:
        repeat += 1
        name = f"{base}_{repeat}"
    taken.add(name)
    return name


def function_name(spec) -> str:
    """The generated function's name for `spec`: its kernel name without a
    repeat suffix (identical kernels share one function); specs named
    otherwise (tests, probes) get `kitsune_<structure hash>`."""
    key = spec.structure_key()
    head, found, _ = spec.name.partition(key[:_HASH])
    return head + key[:_HASH] if found and head.startswith("kitsune_") else f"kitsune_{key}"
