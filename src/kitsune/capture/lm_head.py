"""The fused LM-head loss as a rewrite of the graph Dynamo hands the backend.

A language model's loss is `F.cross_entropy(F.linear(hidden, W, b) ...)` with
the [N, V] logits reshaped, sliced or upcast in between, e.g. HF transformers'

    logits = F.linear(h, W)                    # [B, T, V]
    logits = logits.float().view(-1, V)        # or logits[..., :-1, :].contiguous()
    loss = F.cross_entropy(logits, labels, ignore_index=-100)

`fuse_lm_head_loss` replaces such a chain by the same views applied to the
hidden states (V replaced by H; the casts and `contiguous` dropped, the op
computes in float32 as the upcast asked) feeding
`kitsune.ops.linear_cross_entropy`, which never materialises the logits. It
works on torch-level ops (`torch._C._nn.linear`, `F.cross_entropy`, tensor
methods), before AOTAutograd, so the forward aten graph holds one
`kitsune::linear_cross_entropy` node and the backward only multiplies.

Logits used elsewhere too (an HF model compiled whole returns them with the
loss) are left alone unless `REWRITE_SHARED_LOGITS` (then the linear stays for
that use). It never changes a result: where anything is not understood (class
weights, reduction "none", an op it does not know between the two) the graph
stays as it is and the `Rewrite` record says why.
"""
from __future__ import annotations

import inspect
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx

from kitsune.capture.rewrites import Rewrite, example_value, inherit_source, rewrite_sites
from kitsune.ops.linear_cross_entropy import linear_cross_entropy

log = logging.getLogger("kitsune")

PATTERN = "softmax_cross_entropy"
OPS = ("linear", "cross_entropy")
CHOICE = "chunked linear+cross-entropy (kitsune::linear_cross_entropy)"
# Logits smaller than this (N * V elements) stay as they are: the chunked loop's
# launches cost more than the memory it saves (4 MB of float32 logits).
MIN_LOGITS = 1 << 20
# On a GPU, where eager's loss runs at memory speed: measured on an H100 (2026-12-07, GPT-2 small
# training steps, bf16 autocast), the chunked loss made the step slower than eager's at
# 2048 x 50257 logits (34.6 against 24.2 ms) and faster at 8192 x 50257 (55.9 against 60.8 ms);
# below this many elements the loss stays eager's (the memory it would save is under 1 GiB).
MIN_LOGITS_GPU = 1 << 28
# How far back from a cross_entropy to look for the linear that made its logits.
MAX_CHAIN = 8
# Logits with another use (a graph output: an HF model compiled whole returns them beside
# the loss). True: the linear stays for that use and the loss still runs chunked; no
# float32 [N, V] log-softmax or gradient is made, but the head's matmul runs twice in
# the forward and AOTAutograd's backward multiplies a tangent of zeros for the returned
# logits (as without the rewrite). On the CPU (GPT-2-like, V=50257, H=128, N=512, one
# thread) that took the step's peak from 403 to 307 MiB and its time from 1.0-1.1 to 1.7-2.2 s,
# so it is off until a GPU measurement says it pays: such a loss stays as it is.
REWRITE_SHARED_LOGITS = False

_CE_SIGNATURE = inspect.signature(F.cross_entropy)
_LINEAR_SIGNATURE = inspect.signature(lambda input, weight, bias=None: None)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fuse_lm_head_loss(gm: fx.GraphModule) -> list[Rewrite]:
    """Rewrite every `linear -> (views, casts) -> cross_entropy` of `gm` (a Dynamo
    graph) into `kitsune.ops.linear_cross_entropy`, in place; one Rewrite per place
    looked at, applied or not (with the reason)."""
    return rewrite_sites(gm, lambda node: node.op == "call_function" and node.target is F.cross_entropy,
                         _lm_head_loss, _replace, "lm-head loss")


def _declined(nodes, reason) -> Rewrite:
    return Rewrite(pattern=PATTERN, ops=OPS, nodes=tuple(nodes), choice=CHOICE, applied=False, reason=reason)


def _lm_head_loss(ce: fx.Node):
    """(Rewrite, plan or None) for a cross_entropy fed by a linear; None where no linear feeds it."""
    try:
        ce_args = _CE_SIGNATURE.bind(*ce.args, **ce.kwargs).arguments
    except TypeError:
        return None
    chain, linear = _chain_to_linear(ce_args.get("input"))
    if linear is None:
        return None
    names = (linear.name, *(n.name for n in reversed(chain)), ce.name)
    reason, steps = _chain_refusal(linear, chain)
    if reason is None:
        reason = _loss_refusal(ce, ce_args, linear, chain)
    shared = _other_uses(linear, chain, ce)
    if reason is None and shared and not REWRITE_SHARED_LOGITS:
        reason = f"the logits are also used by {shared}"
    if reason is not None:
        return _declined(names, reason), None
    plan = {"linear": linear, "chain": chain, "steps": steps, "ce_args": ce_args}
    choice = CHOICE + (f"; the logits are still computed for {shared}" if shared else "")
    return Rewrite(pattern=PATTERN, ops=OPS, nodes=names, choice=choice), plan


def _chain_to_linear(node):
    """The nodes from the cross_entropy's input back to a linear (nearest first), and the
    linear; (.., None) when following first arguments does not reach one."""
    chain = []
    while isinstance(node, fx.Node) and len(chain) <= MAX_CHAIN:
        if node.op == "call_function" and node.target is F.linear:
            return chain, node
        if node.op not in ("call_function", "call_method") or not node.args:
            break
        chain.append(node)
        node = node.args[0]
    return chain, None


def _chain_refusal(linear, chain):
    """(reason or None, replay steps) for the nodes between the linear and the loss."""
    logits = example_value(linear)
    if logits is None or logits.dtype not in _FLOATS or logits.dim() < 2:
        return "the logits are not a float tensor of at least 2 dims", None
    steps = []
    producer = linear
    for node in reversed(chain):
        step = _replay_step(node, example_value(producer), logits.shape[-1])
        if isinstance(step, str):
            return step, None
        steps.append(step)
        producer = node
    return None, steps


def _other_uses(linear, chain, ce) -> str:
    """The users of the logits (the linear or a node of the chain) other than the chain and
    the loss, by name ("output" for the graph's output); "" when there are none."""
    own = set(chain) | {ce}
    others = [u.name for n in (linear, *chain) for u in n.users if u not in own]
    return ", ".join(dict.fromkeys(others))


def _replay_step(node, before, vocab):
    """How `node` is replayed on the hidden states: ("skip",), ("reshape", leading sizes) or
    ("getitem", index); or the reason it cannot be, as a string."""
    after = example_value(node)
    if before is None or after is None:
        return f"{node.name}: no example value"
    kind = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method" and kind in ("float", "to", "contiguous"):
        if after.shape != before.shape or after.device != before.device or after.dtype not in _FLOATS or \
                torch.promote_types(after.dtype, before.dtype) != after.dtype:
            return f"{node.name}: .{kind}() is not a copy or an upcast of the logits"
        return ("skip",)
    if (node.op == "call_method" and kind in ("view", "reshape")) or \
            (node.op == "call_function" and node.target is torch.reshape):
        return _reshape_step(node, before, after, vocab)
    if node.op == "call_function" and node.target is operator.getitem:
        return _getitem_step(node, before, vocab)
    return f"{node.name} ({kind}) between linear and cross_entropy is not a view or an upcast"


def _reshape_step(node, before, after, vocab):
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if node.kwargs or not shape or after.dtype != before.dtype:
        return f"{node.name}: a reshape Kitsune does not read"
    last, leading = shape[-1], tuple(shape[:-1])
    keeps_rows = isinstance(last, int) and (last == vocab or (last == -1 and -1 not in leading))
    if not keeps_rows or after.dim() < 1 or after.shape[-1] != vocab:
        return f"{node.name}: the reshape does not keep the vocabulary as the last dim"
    return ("reshape", leading)


def _getitem_step(node, before, vocab):
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) or i is Ellipsis for i in index) or index.count(Ellipsis) > 1:
        return f"{node.name}: an index that is not slices of the logits"
    # the slice that meets the last dim must take all of it
    if Ellipsis in index:
        last = index[-1] if index[-1] is not Ellipsis else None
    else:
        last = index[before.dim() - 1] if len(index) >= before.dim() else None
    if last is not None and last != slice(None, None, None):
        return f"{node.name}: slices the vocabulary dim"
    return ("getitem", node.args[1])


def _loss_refusal(ce, ce_args, linear, chain):
    """Why this cross_entropy call cannot be the chunked op, or None."""
    for name in ("weight", "size_average", "reduce"):
        if ce_args.get(name) is not None:
            return f"cross_entropy with {name}= is not fused"
    reduction = ce_args.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        return f"cross_entropy with reduction={reduction!r} is not fused (no scalar loss)"
    ignore_index = ce_args.get("ignore_index", -100)
    smoothing = ce_args.get("label_smoothing", 0.0)
    if not isinstance(ignore_index, int) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
        return "cross_entropy's ignore_index or label_smoothing is not a constant the op takes"
    logits, target, loss = example_value(chain[0] if chain else linear), example_value(ce_args.get("target")), example_value(ce)
    if logits is None or target is None or loss is None or logits.dim() != 2:
        return "cross_entropy's input is not [N, V] logits"
    if not isinstance(ce_args["target"], fx.Node) or target.dim() != 1 or target.dtype != torch.long:
        return "cross_entropy's target is not [N] class indices"
    weight = example_value(_linear_args(linear)["weight"])
    if weight is None or weight.dim() != 2:
        return "the linear's weight is not a matrix"
    return too_small(_size_hint(logits.shape[0]) * _size_hint(logits.shape[1]), logits.device.type)


def too_small(elements: int, device_type: str) -> str | None:
    """Why logits of this many elements stay eager's on this device (MIN_LOGITS, on a GPU also
    MIN_LOGITS_GPU), or None."""
    floor = MIN_LOGITS if device_type == "cpu" else max(MIN_LOGITS, MIN_LOGITS_GPU)
    if elements < floor:
        return f"logits of {elements} elements are below {floor}: too small to pay"
    return None


def _replace(graph: fx.Graph, ce: fx.Node, plan) -> None:
    """Insert the chunked loss before `ce`, hand it ce's users, and erase ce, and the chain
    and the linear where nothing else uses them."""
    linear, chain = plan["linear"], plan["chain"]
    args = _linear_args(linear)
    matmul_dtype, width, loss_dtype = example_value(linear).dtype, example_value(args["weight"]).shape[1], example_value(ce).dtype
    ce_args = plan["ce_args"]
    before = ce.prev  # every value read before the graph changes: nothing below fails half-way
    with graph.inserting_before(ce):
        hidden = _cast(graph, args["input"], matmul_dtype)  # autocast's cast, made explicit
        for step in plan["steps"]:
            if step[0] == "reshape":
                hidden = graph.call_method("reshape", (hidden, *step[1], width))
            elif step[0] == "getitem":
                hidden = graph.call_function(operator.getitem, (hidden, step[1]))
        weight = _cast(graph, args["weight"], matmul_dtype)
        bias = _cast(graph, args.get("bias"), matmul_dtype)
        loss = graph.call_function(linear_cross_entropy, (hidden, weight, bias, ce_args["target"]), {
            "ignore_index": ce_args.get("ignore_index", -100),
            "label_smoothing": float(ce_args.get("label_smoothing", 0.0)),
            "reduction": ce_args.get("reduction", "mean"),
            "dtype": loss_dtype})
    loss.meta["example_value"] = example_value(ce)  # the same loss: shape [], ce's dtype
    node = before.next
    while node is not ce:  # the nodes just inserted
        inherit_source(node, ce)
        node = node.next
    ce.replace_all_uses_with(loss)
    graph.erase_node(ce)
    for node in (*chain, linear):  # what is left without users: all of it unless the logits are shared
        if not node.users:
            graph.erase_node(node)


def _cast(graph, node, dtype):
    value = example_value(node)
    if node is None or value is None or value.dtype == dtype:
        return node
    return graph.call_method("to", (node, dtype))


def _linear_args(linear: fx.Node) -> dict:
    return _LINEAR_SIGNATURE.bind(*linear.args, **linear.kwargs).arguments


def _size_hint(size) -> int:
    """A size as an int without adding a guard: a symbolic size's hint (large when unknown)."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else MIN_LOGITS
