"""How many kernels eager PyTorch launches for a captured aten graph: the
`kernels_before` of `kitsune.get_fusion_stats()`.

A captured graph is not what eager runs: AOTAutograd decomposes each op the
user's code (or autograd, in the backward) dispatched into primitives, so a
`layer_norm` arrives as nine compute nodes (and two views) that eager runs as
one kernel. Every node records the op it came from (`meta["original_aten"]`)
and which call of it (`seq_nr`: autograd's sequence number of the forward op,
in both graphs;
`source_fn_stack`: Dynamo's name of the user's call, in forward and inference
graphs). The estimate is one kernel per aten op eager dispatches:

- a node that is its own `original_aten` (an `mm`, an `add`, a
  `_scaled_dot_product_flash_attention_for_cpu` kept whole) is one kernel;
- the decomposed nodes of one call of one op are one kernel together
  (`F.layer_norm`: 1; `F.cross_entropy`: 2, its `log_softmax` and `nll_loss`;
  a `Linear`'s backward: 3, two `mm` and the bias gradient's `sum`);
- views (and `split`), `getitem` and allocations launch nothing;
- work that AOTAutograd's partitioner moved between the graphs is counted
  where eager does it: forward ops the backward recomputes are not counted in
  the backward (eager saved them), and the part of a backward op computed
  early in the forward graph (a ReLU's mask) is counted in the backward.

It is an estimate: a library op that launches several kernels on the GPU
(`native_layer_norm_backward`'s input and weight gradients) counts as one, and
a graph without this metadata (one built by hand) counts one kernel per node.
"""
from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from kitsune.ir.ops import VIEW_OPS

aten = torch.ops.aten
log = logging.getLogger("kitsune")

# Ops that allocate, rename or split into views without launching a kernel.
_FREE = {operator.getitem, aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
         aten.detach.default, aten.split.Tensor, aten.split_with_sizes.default,
         aten.unbind.int, aten.chunk.default}

# partitioner_tag of the nodes that belong to the other graph, by graph kind
_OTHER_SIDE = {"forward": "is_backward", "backward": "is_forward"}


def eager_kernel_count(graph: fx.Graph, kind: str = "graph") -> int:
    """Kernels eager PyTorch launches for `graph` (an aten graph of kind
    "forward", "backward", "inference" or anything else), as the module says.
    Metadata it cannot read gives the captured count instead (logged)."""
    try:
        return _count_calls(graph, kind)
    except Exception as error:  # noqa: BLE001 - a statistic must never stop a compile
        log.debug("cannot estimate eager kernels of the %s graph: %s: %s", kind, type(error).__name__, error)
        return captured_kernel_count(graph)


def _count_calls(graph: fx.Graph, kind: str) -> int:
    count, seen, previous = 0, set(), None
    for node in graph.nodes:
        if not _launches(node) or _belongs_elsewhere(node, kind):
            continue
        key = _call_key(node)
        if isinstance(key, fx.Node):
            count += 1
        elif key[1] is not None or key[2] is not None:  # one call of one op, wherever its nodes are
            count += key not in seen
            seen.add(key)
        else:  # nothing tells two calls apart: adjacent nodes of one op are one call
            count += key != previous
        previous = key
    return count


def captured_kernel_count(graph: fx.Graph) -> int:
    """The operations of `graph` as captured that launch a kernel (views, `getitem` and
    allocations aside): what it runs when nothing fuses."""
    return sum(map(_launches, graph.nodes))


def _launches(node: fx.Node) -> bool:
    """Does eager run this node as (part of) a kernel: an op with a tensor result
    that is not a view, an allocation or a tuple element?"""
    if node.op != "call_function" or node.target in VIEW_OPS or node.target in _FREE \
            or getattr(node.target, "kitsune_free", False):
        return False
    val = node.meta.get("val")
    values = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) for v in values)


def _belongs_elsewhere(node: fx.Node, kind: str) -> bool:
    """A node the partitioner moved from the other graph: forward work recomputed in
    the backward, or backward work done early in the forward."""
    tag = node.meta.get("partitioner_tag")
    if tag is None and kind == "forward" and node.meta.get("autograd_backward"):
        tag = "is_backward"
    return tag is not None and tag == _OTHER_SIDE.get(kind)


def _call_key(node: fx.Node):
    """The node itself where it is the op eager dispatched (or nothing says which
    op it came from), else (op it came from, autograd seq_nr, Dynamo's call name)."""
    original = node.meta.get("original_aten")
    # by name: a graph copied by AOTAutograd's cache holds other OpOverload objects
    if original is None or str(original) == str(node.target):
        return node
    seq = node.meta.get("seq_nr")
    source = node.meta.get("source_fn_stack")
    return (str(original), seq if isinstance(seq, int) and seq >= 0 else None, source[-1][0] if source else None)
