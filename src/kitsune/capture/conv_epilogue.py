"""Convolution + bias + ReLU (and + residual add + ReLU) in cuDNN's own epilogue.

After batch-norm folding (kitsune.capture.fold) a ResNet block's
``relu(bn(conv(x)))`` is ``relu(conv(x, W') + b')`` and its last one
``relu(conv(x, W') + b' + identity)``. cuDNN runs both as one fused
convolution (`aten.cudnn_convolution_relu`, `aten.cudnn_convolution_add_relu`:
the bias, the residual and the ReLU applied to the accumulator before the
store), which removes the elementwise pass over the activation that a
generated kernel after the convolution still costs. Whether cuDNN's fused
engine is faster than its plain convolution plus that pass depends on the
shape and the GPU, so each distinct configuration is measured once per
process on random tensors of its shapes, strides and dtype (values do not
change a convolution's time): the fused call against the plain convolution
plus an elementwise pass of the same traffic (a copy, or an add for the
residual). The faster one is kept and the choice is reported with both times.

Inference graphs on CUDA only (the fused ops have no autograd); anything the
match does not prove (a dilated output layout, a residual of another layout,
a symbolic size) keeps the graph as it is.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from kitsune.capture.rewrites import Rewrite
from kitsune.capture.timing import random_like, refusal_by_time, time_ms

log = logging.getLogger("kitsune")

aten = torch.ops.aten
# configuration -> (fused ms, unfused ms): measured once per process
_MEASURED: dict = {}


def fuse_conv_relu(gm: fx.GraphModule, rewrites: list, measure=None, devices=("cuda",)) -> int:
    """Rewrite each convolution → (+ bias) → (+ residual) → ReLU on CUDA where
    cuDNN's fused call measures faster; extends `rewrites` (the fold's records
    get the choice appended); returns how many were rewritten. `measure`
    (tests): (conv node, residual node or None) -> (fused ms, unfused ms);
    `devices` (tests): the device types the fused calls exist on."""
    measure = measure or _measure
    by_conv = {name: rw for rw in rewrites for name in rw.nodes}
    done = 0
    for relu in list(gm.graph.nodes):
        if relu.op != "call_function" or relu.target is not aten.relu.default:
            continue
        match = _match(relu)
        if match is None:
            continue
        conv, bias, residual, chain = match
        why = _refusal(conv, residual, relu, devices)
        if why is None:
            why, fused_ms, plain_ms = refusal_by_time(measure, (conv, residual), "cuDNN's fused call",
                                                      "conv + kernel")
        ops = ("conv", "add", "relu") if residual is not None else ("conv", "relu")
        folded = by_conv.get(conv.name)
        if why is not None:
            if folded is None:
                rewrites.append(Rewrite("conv_bn_activation", ops, (conv.name, relu.name), applied=False,
                                        reason=why))
            continue
        _replace(gm.graph, conv, bias, residual, relu)
        choice = f"cuDNN fused conv+bias{'+add' if residual is not None else ''}+ReLU " \
                 f"({fused_ms:.3f} ms against {plain_ms:.3f} ms for conv + kernel)"
        if folded is not None:
            folded.choice, folded.ops = f"folded; {choice}", folded.ops + ops[1:]
            folded.seconds = fused_ms / 1e3
        else:
            rewrites.append(Rewrite("conv_bn_activation", ops, (conv.name, relu.name), choice=choice,
                                    seconds=fused_ms / 1e3))
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.info("%d convolution(s) with their ReLU run as cuDNN fused calls", done)
    return done


def _single_user(node) -> bool:
    return isinstance(node, fx.Node) and len(node.users) == 1


def _conv_bias(node):
    """(conv, bias node) when `node` is conv(x, w, b) or conv(x, w, None) + b.view(1, -1, 1, 1)."""
    if not _single_user(node) or node.op != "call_function":
        return None
    if node.target is aten.convolution.default and node.args[2] is not None:
        return node, node.args[2]
    if node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
        conv, view = node.args
        if isinstance(conv, fx.Node) and conv.target is aten.convolution.default and conv.args[2] is None \
                and _single_user(conv) and isinstance(view, fx.Node) and view.target is aten.view.default:
            bias = view.args[0]
            channels = conv.meta["val"].shape[1]
            if isinstance(bias, fx.Node) and tuple(bias.meta["val"].shape) == (channels,) \
                    and list(view.args[1]) in ([1, -1, 1, 1], [1, channels, 1, 1]):
                return conv, bias
    return None


def _match(relu: fx.Node):
    """(conv, bias, residual or None, chain) feeding `relu`, or None."""
    src = relu.args[0]
    found = _conv_bias(src)
    if found is not None:
        return found[0], found[1], None, src
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target is aten.add.Tensor \
            and _single_user(src) and len(src.args) == 2 and not src.kwargs:
        for inner, residual in (src.args, src.args[::-1]):
            found = _conv_bias(inner) if isinstance(residual, fx.Node) else None
            if found is not None:
                return found[0], found[1], residual, src
    return None


def _refusal(conv: fx.Node, residual, relu: fx.Node, devices) -> str | None:
    val = conv.meta["val"]
    if val.device.type not in devices:
        return "not on a CUDA device"
    if val.dim() != 4 or conv.args[6] or any(conv.args[7]):
        return "not a 2-D forward convolution"
    if val.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{val.dtype} convolution"
    if conv.args[0].meta["val"].dtype != val.dtype or conv.args[1].meta["val"].dtype != val.dtype:
        return "mixed dtypes"
    if conv.args[8] != 1:
        # cuDNN runs a grouped (depthwise) convolution's fused call in a direct kernel:
        # on an H100 MobileNetV3's took 5.9 ms a call against 1.0 ms for the plain ones
        return "a grouped convolution (cuDNN's fused call has no fast grouped kernel)"
    if any(not isinstance(s, int) for s in val.shape) or not torch.backends.cudnn.enabled:
        return "symbolic sizes" if torch.backends.cudnn.enabled else "cuDNN is disabled"
    out = relu.meta["val"]
    if out.stride() != val.stride() or out.dtype != val.dtype:
        return "the result's layout differs from the convolution's"
    if residual is not None:
        z = residual.meta.get("val")
        if not isinstance(z, torch.Tensor) or z.shape != val.shape or z.stride() != val.stride() \
                or z.dtype != val.dtype:
            return "the residual's shape, layout or dtype differs from the convolution's"
    return None


def _conv_params(conv: fx.Node) -> tuple:
    _, _, _, stride, padding, dilation, _, _, groups = conv.args
    return list(stride), list(padding), list(dilation), groups


def _replace(graph: fx.Graph, conv, bias, residual, relu) -> None:
    x, weight = conv.args[0], conv.args[1]
    stride, padding, dilation, groups = _conv_params(conv)
    with graph.inserting_before(relu):
        if residual is None:
            node = graph.call_function(aten.cudnn_convolution_relu.default,
                                       (x, weight, bias, stride, padding, dilation, groups))
        else:
            node = graph.call_function(aten.cudnn_convolution_add_relu.default,
                                       (x, weight, residual, 1.0, bias, stride, padding, dilation, groups))
    node.meta.update({k: v for k, v in conv.meta.items() if k != "val"})
    node.meta["val"] = relu.meta["val"]
    relu.replace_all_uses_with(node)


def _measure(conv: fx.Node, residual) -> tuple[float, float]:
    """(fused ms, plain conv + one elementwise pass ms) for this configuration."""
    x_val, w_val, out_val = conv.args[0].meta["val"], conv.args[1].meta["val"], conv.meta["val"]
    stride, padding, dilation, groups = _conv_params(conv)
    key = (tuple(x_val.shape), x_val.stride(), tuple(w_val.shape), w_val.stride(), x_val.dtype,
           str(x_val.device), tuple(stride), tuple(padding), tuple(dilation), groups, residual is not None)
    if key not in _MEASURED:
        with torch.no_grad():
            x, w = random_like(x_val), random_like(w_val)
            b = torch.randn(out_val.shape[1], dtype=out_val.dtype, device=out_val.device)
            z = random_like(out_val) if residual is not None else None
            if z is None:
                fused = lambda: aten.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)  # noqa: E731
            else:
                fused = lambda: aten.cudnn_convolution_add_relu(  # noqa: E731
                    x, w, z, 1.0, b, stride, padding, dilation, groups)
            got = fused()
            if got.stride() != out_val.stride():
                raise RuntimeError(f"cuDNN's fused call returns strides {got.stride()}, not {out_val.stride()}")

            def plain():
                y = aten.convolution(x, w, None, stride, padding, dilation, False, [0, 0], groups)
                return y.clone() if z is None else torch.add(y, z)
            _MEASURED[key] = (time_ms(fused), time_ms(plain))
    return _MEASURED[key]
