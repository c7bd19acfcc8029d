"""Attention keeps eager's kernel choice on the GPU.

`F.scaled_dot_product_attention` picks its kernel (cuDNN, flash, memory-
efficient or the math fallback) when it runs, from the real tensors. When
AOTAutograd traces a graph it runs it on fake tensors, and there the choice
(`torch._fused_sdp_choice`) is the math fallback: BERT-base's attention with
its padding mask became an upcast float32 batched matmul and softmax, 0.71 ms
a forward on an H200, where eager's cuDNN kernel takes 0.11 ms.

`route_attention` therefore replaces, in Dynamo's graph and before
AOTAutograd sees it, each CUDA attention call by `kitsune::sdpa`: a custom op
(`torch.library`) whose forward is `F.scaled_dot_product_attention` itself,
so at run time the same kernel as in eager runs, and whose backward
(`kitsune::sdpa_backward`) recomputes the attention and differentiates it
(`torch.func.vjp`), with eager's kernels too (one attention forward more than
eager's backward, which keeps the kernel's own saved statistics). Kitsune
leaves both ops whole (they run through PyTorch).

Only calls without dropout are routed (a dropout would draw from the random
generator inside an opaque op, out of sight of the CUDA-graph check), and
only where the mask needs no gradient.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger("kitsune")


@torch.library.custom_op("kitsune::sdpa", mutates_args=())
def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
         is_causal: bool, scale: float | None) -> torch.Tensor:
    # contiguous: the fake output below must describe the real one, whatever the kernel
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale).contiguous()


@sdpa.register_fake
def _(query, key, value, attn_mask, is_causal, scale):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.custom_op("kitsune::sdpa_backward", mutates_args=())
def sdpa_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None, is_causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # torch.func, not torch.autograd: autograd does not record inside a custom op's kernel
    _, vjp = torch.func.vjp(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale), query, key, value)
    dq, dk, dv = vjp(grad)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sdpa_backward.register_fake
def _(grad, query, key, value, attn_mask, is_causal, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale = inputs
    ctx.save_for_backward(query, key, value, attn_mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad):
    query, key, value, attn_mask = ctx.saved_tensors
    dq, dk, dv = sdpa_backward(grad.contiguous(), query, key, value, attn_mask, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None


sdpa.register_autograd(_backward, setup_context=_setup_context)

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def route_attention(gm: fx.GraphModule) -> int:
    """Point Dynamo-graph calls of `F.scaled_dot_product_attention` on CUDA
    tensors at `kitsune::sdpa`; returns how many were routed."""
    routed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        args = dict(zip(_PARAMS, node.args))
        args.update(node.kwargs)
        value = node.meta.get("example_value")
        mask = args.get("attn_mask")
        mask_value = mask.meta.get("example_value") if isinstance(mask, fx.Node) else mask
        if (not isinstance(value, torch.Tensor) or value.device.type != "cuda"
                or args.get("dropout_p", 0.0) != 0.0 or args.get("enable_gqa", False)
                or (isinstance(mask_value, torch.Tensor) and mask_value.requires_grad)
                or not all(isinstance(args.get(k), fx.Node) for k in ("query", "key", "value"))
                or (mask is not None and not isinstance(mask, fx.Node))
                or not isinstance(args.get("is_causal", False), bool)
                or not isinstance(args.get("scale"), (float, int, type(None)))):
            continue
        scale = args.get("scale")
        node.target = torch.ops.kitsune.sdpa.default
        node.args = (args["query"], args["key"], args["value"], mask, args.get("is_causal", False),
                     None if scale is None else float(scale))
        node.kwargs = {}
        routed += 1
    if routed:
        gm.recompile()
        log.debug("kitsune: %d attention call(s) keep eager's kernel choice (kitsune::sdpa)", routed)
    return routed
