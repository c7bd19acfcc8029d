"""Inference batch norm: folded into the convolution before it, or decomposed
into the pointwise chain it is.

A batch norm with frozen statistics (`_native_batch_norm_legit_no_training`,
a model in `eval()`) is an affine map per channel. Two ways to run it:

- **folded** (`fold_conv_batch_norm`): after a convolution that only it reads,
  in an inference graph, the scale goes into the convolution's weights and the
  shift becomes a bias: ``conv(x, W) * s + t == conv(x, W * s) + t``. The
  folded weights are computed once, in float32 (float64 for a float64 model),
  and cast once to the weights' dtype, so a bf16 model's rounding is that of
  one bf16 weight, not of a bf16 activation. They are recomputed when a
  weight, a running statistic or an affine parameter changes: each call
  checks the tensors' identity and version counters (an in-place update such
  as `load_state_dict`, an optimizer step or `bn.running_var.fill_()` bumps the
  version). The bias add joins the generated kernel after the convolution
  (with its ReLU, residual add, ...), in the convolution's layout.
- **decomposed** (`decompose_batch_norm`): everywhere else, the normalisation
  as pointwise ops computed in the input's opmath dtype, as eager's kernel
  and PyTorch's `native_batch_norm_helper` do; they fuse with the producer's
  consumers (a ReLU, a residual add).

Both run on the aten graphs AOTAutograd hands over (batch norm is left whole
by the capture's decomposition table so that the convolution before it can
still be seen).
"""
from __future__ import annotations

import logging
import operator
import weakref

import torch
from torch import fx

from kitsune.capture.rewrites import USER_OP_META, NodeBuilder, Rewrite

log = logging.getLogger("kitsune")

aten = torch.ops.aten
prims = torch.ops.prims
BATCH_NORM = aten._native_batch_norm_legit_no_training.default
_CASTS = (prims.convert_element_type.default, aten._to_copy.default)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_view(builder: NodeBuilder, node: fx.Node, ndim: int) -> fx.Node:
    return builder(aten.view.default, node, [1, -1] + [1] * (ndim - 2))


def _cast(builder: NodeBuilder, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    if node.meta["val"].dtype == dtype:
        return node
    return builder(prims.convert_element_type.default, node, dtype)


# -- decomposed ---------------------------------------------------------------------

def decompose_batch_norm(gm: fx.GraphModule) -> int:
    """Every inference batch norm left in `gm` as pointwise ops; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is BATCH_NORM and _only_output_used(node):
            _decompose(gm.graph, node)
            count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def _decompose(graph: fx.Graph, bn: fx.Node) -> None:
    x, weight, bias, mean, var, _momentum, eps = bn.args
    build = NodeBuilder(graph, bn, bn)
    ndim, dtype = x.meta["val"].dim(), x.meta["val"].dtype
    acc = _opmath(dtype)
    invstd = build(aten.rsqrt.default, build(aten.add.Tensor, _cast(build, var, acc), eps))
    out = build(aten.sub.Tensor, _cast(build, x, acc), _channel_view(build, _cast(build, mean, acc), ndim))
    out = build(aten.mul.Tensor, out, _channel_view(build, invstd, ndim))
    if weight is not None:
        out = build(aten.mul.Tensor, out, _channel_view(build, _cast(build, weight, acc), ndim))
    if bias is not None:
        out = build(aten.add.Tensor, out, _channel_view(build, _cast(build, bias, acc), ndim))
    result = _cast(build, out, dtype)
    for user in list(bn.users):
        user.replace_all_uses_with(result)


def _only_output_used(bn: fx.Node) -> bool:
    """Only the normalised tensor (getitem 0) of the batch norm is read."""
    return bool(bn.users) and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                                  for u in bn.users)


# -- folded -------------------------------------------------------------------------

class ConvBnFold:
    """The folded weight and bias of one convolution + batch norm.

    `folded(...)` takes the six tensors the fold reads (the convolution's
    weight and bias, the norm's weight, bias, running mean and running
    variance; absent ones None) and returns the folded weight and bias,
    recomputing them only when one of those tensors is another object or has
    been changed in place since the last call. A recomputation writes into the
    tensors it returned before when their shape and dtype still fit, so their
    addresses stay fixed (a CUDA graph recorded with them stays valid; it runs
    `refresh` before each replay)."""

    def __init__(self, eps: float, weight_dtype: torch.dtype):
        self.eps, self.weight_dtype = eps, weight_dtype
        self._refs: tuple = ()
        self._versions: tuple = ()
        self._weight = self._bias = None
        self.refolds = 0  # how many times the folded tensors were computed

    def folded(self, *tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias), checked against their sources once per call."""
        self.refresh(tensors)
        return self._weight, self._bias

    def refresh(self, tensors) -> None:
        versions = tuple(None if t is None else t._version for t in tensors)
        if versions == self._versions and all(
                (r is None and t is None) or (r is not None and r() is t) for r, t in zip(self._refs, tensors)):
            return
        weight, bias = self._fold(*tensors)
        if self._weight is not None and _fits(self._weight, weight) and _fits(self._bias, bias):
            self._weight.copy_(weight)
            self._bias.copy_(bias)
        else:
            self._weight, self._bias = weight, bias
        self._refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._versions = versions
        self.refolds += 1

    @torch.no_grad()
    def _fold(self, conv_weight, conv_bias, bn_weight, bn_bias, mean, var):
        acc = _opmath(conv_weight.dtype)
        scale = torch.rsqrt(var.to(acc) + self.eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(acc)
        shift = -mean.to(acc) if conv_bias is None else conv_bias.to(acc) - mean.to(acc)
        shift = shift * scale
        if bn_bias is not None:
            shift = shift + bn_bias.to(acc)
        shape = [-1] + [1] * (conv_weight.dim() - 1)
        # In the source weight's strides, as the graph's fake value says: a product's
        # layout is ambiguous where a dim has size 1 (a depthwise [C, 1, k, k] weight in
        # channels-last), and cuDNN chose a 6x slower kernel for a depthwise weight
        # that came out contiguous beside channels-last activations (MobileNetV3, H100).
        weight = torch.empty_like(conv_weight, dtype=self.weight_dtype)
        weight.copy_(conv_weight.to(acc) * scale.view(shape))
        return weight, shift


# a call that returns cached tensors launches nothing (kitsune.ir.eager_count, planner.units)
ConvBnFold.folded.kitsune_free = True


def _fits(old: torch.Tensor, new: torch.Tensor) -> bool:
    return old.shape == new.shape and old.dtype == new.dtype and old.stride() == new.stride() \
        and old.device == new.device


def fold_conv_batch_norm(gm: fx.GraphModule) -> tuple[list[Rewrite], list]:
    """Fold each batch norm that reads a convolution into that convolution's
    weights (call only on inference graphs: the fold has no gradient). Returns
    the rewrites (applied or declined, with the reason) and, per fold,
    (ConvBnFold, positions of its six tensors among the graph's placeholders),
    which a CUDA-graph replay refreshes before each replay."""
    rewrites, folds = [], []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target is not BATCH_NORM:
            continue
        conv = bn.args[0]
        if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target is aten.convolution.default):
            continue
        why = _fold_refusal(conv, bn, placeholders)
        names = (conv.name, bn.name)
        if why is not None:
            rewrites.append(Rewrite("conv_bn_activation", ("conv", "batch_norm"), names, applied=False, reason=why))
            continue
        fold, sources, new, choice = _fold(gm.graph, conv, bn)
        folds.append((fold, tuple(None if s is None else placeholders.index(s) for s in sources)))
        rewrites.append(Rewrite("conv_bn_activation", ("conv", "batch_norm"), names + new, choice=choice))
    if folds:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.info("folded %d batch norm(s) into the convolution before them", len(folds))
    return rewrites, folds


def _weight_source(node):
    """The graph input a convolution weight comes from (through a dtype cast:
    autocast), or None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "placeholder" else None


def _fold_refusal(conv: fx.Node, bn: fx.Node, placeholders) -> str | None:
    if conv.args[6]:
        return "a transposed convolution is not folded"
    if len(conv.users) != 1:
        return "the convolution's output is read by more than the batch norm"
    if not _only_output_used(bn):
        return "the batch norm's saved statistics are read"
    _, _, bias, mean, var, _, eps = bn.args
    inputs = [conv.args[1], conv.args[2], bn.args[1], bias, mean, var]
    if _weight_source(conv.args[1]) is None:
        return "the convolution's weight is computed in the graph, not a parameter"
    if any(isinstance(t, fx.Node) and t.op != "placeholder" for t in inputs[1:]):
        return "a batch-norm statistic or parameter is computed in the graph"
    if any(t is not None and not isinstance(t, fx.Node) for t in inputs) or not isinstance(eps, (int, float)):
        return "an argument is not a tensor"
    if not conv.meta["val"].is_floating_point():
        return "not a floating-point convolution"
    return None



def _fold(graph: fx.Graph, conv: fx.Node, bn: fx.Node):
    """Replace conv → batch norm by conv(x, folded weight) + folded bias."""
    x, weight_in = conv.args[0], conv.args[1]
    conv_bias, (bn_weight, bn_bias, mean, var, eps) = conv.args[2], (bn.args[1:5] + (bn.args[6],))
    sources = (_weight_source(weight_in), conv_bias, bn_weight, bn_bias, mean, var)
    weight_val = weight_in.meta["val"]
    fold = ConvBnFold(float(eps), weight_val.dtype)
    build = NodeBuilder(graph, bn, bn)
    out_val = conv.meta["val"]
    acc = _opmath(out_val.dtype)
    weight_fake = _fake_like(build, weight_val)
    bias_fake = _fake_like(build, mean.meta["val"], dtype=acc, shape=(weight_val.shape[0],))
    pair = build(fold.folded, *sources, val=(weight_fake, bias_fake))
    pair.meta.pop("original_aten", None)  # a cached value, no user op's kernel
    folded_weight = build(operator.getitem, pair, 0, val=weight_fake)
    folded_bias = build(operator.getitem, pair, 1, val=bias_fake)
    # The bias joins the kernel after the convolution (its ReLU, residual add); where
    # nothing pointwise follows, the convolution adds it (no kernel of its own).
    in_conv = out_val.dtype == acc and all(_reads_whole(u) for u in bn.users)
    conv_args = (x, folded_weight, folded_bias if in_conv else None) + tuple(conv.args[3:])
    new_conv = build(aten.convolution.default, *conv_args, val=out_val)
    new_conv.meta.update({k: conv.meta[k] for k in USER_OP_META if k in conv.meta})
    if in_conv:
        result, choice = new_conv, "folded into the convolution's weights and bias"
    else:
        choice = "folded into the convolution's weights (bias added in the kernel after it)"
        out = build(aten.add.Tensor, _cast(build, new_conv, acc), _channel_view(build, folded_bias, out_val.dim()))
        result = _cast(build, out, out_val.dtype)
    for user in list(bn.users):
        user.replace_all_uses_with(result)
    return fold, sources, (new_conv.name,), choice


def _reads_whole(getitem: fx.Node) -> bool:
    """Every reader of the norm's output is another convolution or the graph's output
    (nothing a bias add could join)."""
    return all(u.op == "output" or u.target is aten.convolution.default for u in getitem.users)


def _fake_like(build: NodeBuilder, val: torch.Tensor, dtype=None, shape=None) -> torch.Tensor:
    """A fake tensor with `val`'s device and layout (and `dtype`/`shape` where given)."""
    with build.fake_mode:
        if shape is not None:
            return torch.empty(shape, dtype=dtype or val.dtype, device=val.device)
        return torch.empty_strided(val.shape, val.stride(), dtype=dtype or val.dtype, device=val.device)
