"""Linear + ReLU/GELU in cuBLASLt's own epilogue (`aten._addmm_activation`).

On CUDA an `addmm` (a Linear) already adds its bias in cuBLAS's epilogue;
cuBLASLt can apply a ReLU or a GELU there too, before the product is stored,
which removes the elementwise pass over the product that a generated kernel
after the matmul still costs (for a 16384x4096 bf16 product, 268 MB of
traffic). Whether that is faster depends on the shape (cuBLASLt's epilogue
kernels are not always its fastest), so each configuration is measured once
per process on random tensors of its shapes and dtype: `_addmm_activation`
against `addmm` plus one elementwise pass; the faster is kept and reported
with both times.

Exactness. The ReLU is exact. cuBLASLt's GELU is the tanh approximation: it
replaces GELU's tanh form exactly and `gelu(x)` (erf) only where the result is
rounded to bfloat16/float16, whose rounding (2^-9 relative) is far coarser
than the approximation's (below 2^-12 relative); a float32 product keeps its
erf GELU as a generated kernel. Inference graphs only (the product feeds the
activation's backward in training graphs, so it has other users anyway).
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from kitsune.capture.rewrites import Rewrite
from kitsune.capture.timing import random_like, refusal_by_time, time_ms

log = logging.getLogger("kitsune")

aten = torch.ops.aten
_MEASURED: dict = {}
_LOW = (torch.float16, torch.bfloat16)


def fuse_addmm_activation(gm: fx.GraphModule, rewrites: list, measure=None, devices=("cuda",)) -> int:
    """Rewrite addmm → relu/gelu as `aten._addmm_activation` where that measures
    faster; extends `rewrites`; returns how many were rewritten. `measure`
    (tests): (addmm node, use_gelu) -> (fused ms, unfused ms)."""
    measure = measure or _measure
    done = 0
    for addmm in list(gm.graph.nodes):
        if addmm.op != "call_function" or addmm.target is not aten.addmm.default:
            continue
        found = _activation_after(addmm)
        if found is None:
            continue
        result, use_gelu, nodes = found
        why = _refusal(addmm, result, use_gelu, devices)
        if why is None:
            why, fused_ms, plain_ms = refusal_by_time(measure, (addmm, use_gelu), "cuBLASLt's epilogue",
                                                      "addmm + kernel")
        ops = ("linear", "gelu" if use_gelu else "relu")
        names = (addmm.name,) + tuple(n.name for n in nodes)
        if why is not None:
            rewrites.append(Rewrite("linear_activation", ops, names, applied=False, reason=why))
            continue
        _replace(gm.graph, addmm, result, use_gelu)
        rewrites.append(Rewrite("linear_activation", ops, names, seconds=fused_ms / 1e3,
                                choice=f"cuBLASLt {'GELU' if use_gelu else 'ReLU'} epilogue "
                                       f"({fused_ms:.3f} ms against {plain_ms:.3f} ms for addmm + kernel)"))
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.info("%d linear(s) with their activation run in cuBLASLt's epilogue", done)
    return done


def _activation_after(addmm: fx.Node):
    """(result node, use_gelu, nodes) when addmm's only reader is a ReLU or one
    GELU (the nodes AOTAutograd's decomposition of `aten.gelu` left), else None."""
    users = list(addmm.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is aten.relu.default:
        return users[0], False, users
    region, frontier = [], list(users)
    while frontier:
        node = frontier.pop()
        if node in region or node.op != "call_function" or str(node.meta.get("original_aten")) != "aten.gelu.default":
            continue
        region.append(node)
        frontier.extend(node.users)
    if not region:
        return None
    inside = set(region) | {addmm}
    if any(u not in inside for u in users) or any(a not in inside for n in region for a in n.all_input_nodes):
        return None
    exits = [n for n in region if any(u not in inside for u in n.users)]
    kinds = [str(n.target) for n in region]
    erfs, tanhs = sum("erf" in k for k in kinds), sum("tanh" in k for k in kinds)
    if len(exits) != 1 or erfs + tanhs != 1:
        return None  # not one GELU (two in a row, or its value read half-way)
    order = {n: i for i, n in enumerate(addmm.graph.nodes)}
    return exits[0], True, sorted(region, key=order.__getitem__)


def _refusal(addmm: fx.Node, result: fx.Node, use_gelu: bool, devices) -> str | None:
    val = addmm.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.device.type not in devices:
        return "not on a CUDA device"
    if val.dim() != 2 or any(not isinstance(s, int) for s in val.shape):
        return "symbolic or batched sizes"
    if addmm.kwargs.get("beta", 1) != 1 or addmm.kwargs.get("alpha", 1) != 1 or len(addmm.args) != 3:
        return "scaled addmm"
    bias = addmm.args[0].meta.get("val")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (val.shape[1],):
        return "the bias is not one value per output column"
    if val.dtype not in (torch.float32,) + _LOW:
        return f"{val.dtype} product"
    if use_gelu and val.dtype not in _LOW:
        return "cuBLASLt's GELU is the tanh approximation: exact enough for bf16/fp16 results only"
    out = result.meta.get("val")
    if not isinstance(out, torch.Tensor) or out.dtype != val.dtype or out.stride() != val.stride():
        return "the activation's result has another dtype or layout than the product"
    return None


def _replace(graph: fx.Graph, addmm: fx.Node, result: fx.Node, use_gelu: bool) -> None:
    bias, a, b = addmm.args
    with graph.inserting_before(result):
        node = graph.call_function(aten._addmm_activation.default, (bias, a, b), {"use_gelu": use_gelu})
    node.meta.update({k: v for k, v in addmm.meta.items() if k != "val"})
    node.meta["val"] = result.meta["val"]
    result.replace_all_uses_with(node)


def _measure(addmm: fx.Node, use_gelu: bool) -> tuple[float, float]:
    """(fused ms, addmm + one elementwise pass ms) for this configuration."""
    vals = [n.meta["val"] for n in addmm.args]
    key = tuple((tuple(v.shape), v.stride(), v.dtype, str(v.device)) for v in vals) + (use_gelu,)
    if key not in _MEASURED:
        with torch.no_grad():
            bias, a, b = (random_like(v) for v in vals)
            act = torch.nn.functional.gelu if use_gelu else torch.relu
            _MEASURED[key] = (time_ms(lambda: aten._addmm_activation(bias, a, b, use_gelu=use_gelu)),
                              time_ms(lambda: act(torch.addmm(bias, a, b))))
    return _MEASURED[key]
