"""Attention as one operation: the function every matched attention form computes.

`attention(q, k, v, ...)` is what the attention rewrite (kitsune.capture.attention)
replaces a hand-written `softmax(q @ k.T * scale + bias) @ v` with, and what the
fused layers call. Its meaning, for q [*, Hq, Lq, D], k [*, Hkv, Lk, D],
v [*, Hkv, Lk, Dv] (3-D inputs [*, L, D] too; Hq a multiple of Hkv: grouped-query
attention, query head h reads key/value head h // (Hq // Hkv), nothing copied):

    s = (q @ k.transpose(-1, -2)) * scale          # scale defaults to 1 / sqrt(D)
    s = s + bias                                   # if bias: float, broadcasts to s
    s = s.masked_fill(causal_mask, -inf)           # if causal: key j > query i (top-left)
    s = s.where(mask, mask_fill)                   # if mask: bool, True keeps
    p = softmax(s, -1)                             # float32 for 16-bit inputs
    p = dropout(p, dropout_p)                      # training only
    out = p @ v                                    # q's dtype

A row whose scores are all -inf gives NaN, as eager's softmax does; a finite
`mask_fill` (`torch.finfo(dtype).min`) fully masking a row gives the uniform average
of v, as eager does.

This module holds the reference implementation (PyTorch's SDPA where it computes
exactly this, the formula above otherwise). On CUDA tensors `attention` runs
either Kitsune's flash kernel (kitsune.ops.flash_attention) or the reference,
whichever measured faster for the call's configuration
(kitsune.ops.attention_dispatch, which also reads KITSUNE_ATTENTION=auto|triton|sdpa);
on CPU tensors the reference.
"""
from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

__all__ = ["attention"]

log = logging.getLogger("kitsune")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, mask_fill: float = float("-inf"), scale: float | None = None,
              causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q @ kᵀ * scale + bias, masked) @ v; see the module docstring for the exact meaning."""
    _check(q, k, v, bias, mask, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.device.type == "cuda" or os.environ.get("KITSUNE_ATTENTION"):
        from kitsune.ops.attention_dispatch import TRITON, choose_implementation
        if choose_implementation(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, _reference) == TRITON:
            return _flash(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p)
    return _reference(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p)


def _flash(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p):
    """Kitsune's flash kernel; the reference where it fails (a GPU that cannot fit its tiles, say)."""
    from kitsune.ops.flash_attention import flash_attention
    try:
        return flash_attention(q, k, v, bias=bias, mask=mask, mask_fill=mask_fill, scale=scale, causal=causal,
                               dropout_p=dropout_p)
    except Exception as error:  # noqa: BLE001 - never crash the model: the reference computes the same
        log.warning("attention: the flash kernel failed (%s: %s); the reference runs", type(error).__name__, error)
        return _reference(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p)


def _reference(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p):
    """SDPA where it computes exactly the module docstring's formula, the formula otherwise."""
    k, v = _expand_groups(q, k), _expand_groups(q, v)
    finite_fill = mask is not None and mask_fill != float("-inf")
    if finite_fill or (causal and (bias is not None or mask is not None)):
        return _formula(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(q, bias, mask), dropout_p=dropout_p,
                                         is_causal=causal, scale=scale)
    return _dead_rows_nan(out, bias, mask)


def _dead_rows_nan(out, bias, mask):
    """out with NaN on the rows whose every score is -inf, as eager's softmax gives (SDPA's fused
    kernels give 0 there). Reads the mask and the bias once more; no data-dependent Python
    branch, so that it traces (AOTAutograd traces this function with fake tensors)."""
    if mask is None and bias is None:
        return out
    if bias is None:
        dead = ~mask.any(dim=-1)
    else:  # a row is dead where each key is masked or has a -inf bias
        lost = torch.isneginf(bias) if mask is None else torch.isneginf(bias) | ~mask
        dead = lost.all(dim=-1)
    return out.masked_fill(dead.unsqueeze(-1), float("nan"))

def _check(q, k, v, bias, mask, dropout_p) -> None:
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"attention: q, k and v must have the same rank >= 3, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: q [..., Lq, D], k [..., Lk, D] and v [..., Lk, Dv] do not agree: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dim() >= 4 and q.shape[-3] % k.shape[-3] != 0:
        raise ValueError(f"attention: query heads ({q.shape[-3]}) must be a multiple of key/value heads ({k.shape[-3]})")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"attention: mask must be a bool tensor (True keeps), got {mask.dtype}")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"attention: bias must be a float tensor, got {bias.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")


def _expand_groups(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """k or v with its heads repeated to q's (the reference copies; the kernel does not)."""
    if q.dim() < 4 or kv.shape[-3] == q.shape[-3]:
        return kv
    return kv.repeat_interleave(q.shape[-3] // kv.shape[-3], dim=-3)


def _sdpa_mask(q, bias, mask):
    """SDPA's attn_mask for bias and a -inf-filled mask (None when neither)."""
    if mask is None:
        return None if bias is None else bias.to(q.dtype)
    if bias is None:
        return mask
    return bias.to(q.dtype).masked_fill(~mask, float("-inf"))


def _formula(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p):
    """The module docstring's formula, step by step (materialises the scores)."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q, k.transpose(-1, -2)).to(compute) * scale
    if bias is not None:
        s = s + bias.to(compute)
    if causal:
        lq, lk = s.shape[-2], s.shape[-1]
        future = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, mask_fill)
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p.to(v.dtype), v)
