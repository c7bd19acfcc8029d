"""Kitsune's flash attention: `kitsune.ops.attention.attention` computed by Triton
kernels (kitsune.ops.flash_attention_kernels) that never materialise the
[Lq, Lk] score matrix, forward and backward.

Why: the hand-written `softmax(q @ k.T * scale + bias) @ v` writes and reads
the scores (and their softmax, and in training their gradient) through memory,
B*H*Lq*Lk elements each time; for 16 heads of 1024 tokens that is 32 MB per
batch element in bf16, against 4 MB of q, k and v. The flash form keeps a tile
of scores in registers, with the online softmax (a running max and sum per
row), and saves only the row's log-sum-exp (as its max and log-sum) for the backward, which recomputes
the scores tile by tile (FlashAttention-2).

What the kernels handle: fp16 / bf16 / fp32 inputs with float32 accumulation
(16-bit softmax probabilities are cast to v's dtype for the second matmul, as
eager's formula does), head dims up to 256 (D and Dv padded to a power of two
with masks), any Lq and Lk, GQA by indexing the kv head (no copy), causal
(top-left) by index arithmetic with fully-future tiles skipped, an additive
float bias and a bool mask read through their broadcast (stride-0) strides,
`mask_fill` applied as a `where` (a finite fill fully masking a row gives the
uniform average; a row of -inf gives NaN, as eager; in the backward that row's
dq is NaN and so are dk and dv of the keys its tiles visit, where eager's NaN
reaches every key of the head: causal tiles the kernel skips stay finite). Gradients: q, k, v (GQA:
summed over each kv head's group) and the bias (summed to its broadcast shape;
the only place a score-sized float32 tensor is made, and only when the bias
requires grad). Dropout (training): a probability is kept where a Philox number
(tl.rand) for its place, keyed by a per-call seed (an int64 tensor drawn from
torch's generator, so `torch.manual_seed` reproduces it, saved for the backward),
is >= dropout_p; the same seed gives the same output. Its stream is not
torch's: with dropout the values differ from the reference's, not the law.

`kitsune::flash_attention` (out, row stats) and `kitsune::flash_attention_backward`
are `torch.library` custom ops (fake implementations, autograd), so AOTAutograd
traces them as one node each; `flash_attention(...)` is the function to call.
On CPU tensors they run only under Triton's interpreter (TRITON_INTERPRET=1):
the tests.
"""
from __future__ import annotations

import math
import os

import torch

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EMPTY = (0,)


def unsupported(q, k, v, bias, mask, dropout_p) -> str | None:
    """Why the kernels cannot compute this call (the caller then uses the reference), or None."""
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (the kernel takes one of fp16, bf16, fp32)"
    if bias is not None and bias.dtype not in DTYPES:
        return f"bias dtype {bias.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]}, {v.shape[-1]} (at most {MAX_HEAD_DIM})"
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3] or k.shape[:-2] != v.shape[:-2]:
        return "q, k and v have different batch dimensions (broadcast batches are not implemented)"
    if q.device.type != "cuda" and not _interpreted():
        return f"tensors on {q.device.type} (the kernel needs CUDA, or TRITON_INTERPRET=1)"
    for name, extra in (("bias", bias), ("mask", mask)):
        if extra is not None and not _broadcasts_to(extra, _score_shape(q, k)):
            return f"{name} of shape {tuple(extra.shape)} enlarges the scores {tuple(_score_shape(q, k))}"
    for name, tensor in (("k", k), ("v", v), ("bias", bias), ("mask", mask)):
        if tensor is not None and tensor.device != q.device:
            return f"{name} is on {tensor.device}, q on {q.device}"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, mask_fill: float = float("-inf"), scale: float | None = None,
                    causal: bool = False, dropout_p: float = 0.0,
                    seed: torch.Tensor | None = None) -> torch.Tensor:
    """`attention(q, k, v, ...)` (kitsune.ops.attention) through the Triton kernels. With dropout,
    `seed` (an int64 tensor of one element on q's device) picks the dropped probabilities;
    drawn from torch's generator when None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=q.device)
    out, _ = flash_attention_op(q, k, v, bias, mask, float(mask_fill), scale, bool(causal), float(dropout_p),
                                seed if dropout_p > 0.0 else None)
    return out


@torch.library.custom_op("kitsune::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       mask: torch.Tensor | None, mask_fill: float, scale: float, causal: bool,
                       dropout_p: float, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [*, Hq, Lq, Dv] in q's dtype, stats [*, Hq, Lq, 2] float32): attention, and each row's
    log-sum-exp of its scores as (max, log2(sum of exp(score - max))) (-inf, -inf for a row with
    no finite score): kept apart, as a finite fill of finfo.min would swallow the sum's log."""
    _check_shapes(q, k, v, bias, mask)
    _check_dropout(dropout_p, seed)
    _check_device(q)
    out = q.new_empty(_out_shape(q, v))
    stats = q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)
    if out.numel() == 0:
        return out, stats
    if k.shape[-2] == 0:  # no keys: the formula's empty softmax times an empty v is zero, as eager
        return out.zero_(), stats.fill_(float("-inf"))
    _launch_forward(_Problem(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, seed), out, stats)
    return out, stats


@flash_attention_op.register_fake
def _fake_forward(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, seed):
    _check_shapes(q, k, v, bias, mask)
    _check_dropout(dropout_p, seed)
    return q.new_empty(_out_shape(q, v)), q.new_empty((*q.shape[:-1], 2), dtype=torch.float32)


@torch.library.custom_op("kitsune::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                bias: torch.Tensor | None, mask: torch.Tensor | None, out: torch.Tensor,
                                stats: torch.Tensor, mask_fill: float, scale: float, causal: bool,
                                dropout_p: float, seed: torch.Tensor | None,
                                bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias) for grad_out; dbias has bias's shape and dtype when bias_grad, else is empty."""
    _check_device(q)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(_EMPTY)
    if q.numel() == 0 or k.numel() == 0 or grad_out.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias.zero_()
    problem = _Problem(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, seed)
    scores = _launch_backward(problem, grad_out, out, stats, dq, dk, dv, bias_grad)
    if bias_grad:
        dbias.copy_(scores.reshape(_score_shape(q, k)).sum_to_size(bias.shape))
    return dq, dk, dv, dbias


@flash_attention_backward_op.register_fake
def _fake_backward(grad_out, q, k, v, bias, mask, out, stats, mask_fill, scale, causal, dropout_p, seed,
                   bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(_EMPTY)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, seed = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.has_bias, ctx.has_mask, ctx.has_seed = bias is not None, mask is not None, seed is not None
    ctx.flags = (mask_fill, scale, causal, dropout_p)
    ctx.save_for_backward(q, k, v, bias, mask, out, stats, seed)


def _backward(ctx, grad_out, _grad_stats):
    q, k, v, bias, mask, out, stats, seed = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    mask = mask if ctx.has_mask else None
    seed = seed if ctx.has_seed else None
    dq, dk, dv, dbias = flash_attention_backward_op(grad_out, q, k, v, bias, mask, out, stats, *ctx.flags, seed,
                                                    ctx.bias_grad)
    return dq, dk, dv, dbias if ctx.bias_grad else None, None, None, None, None, None, None


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(q, k, v, bias, mask) -> None:
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"flash_attention: q, k and v must have one rank >= 3, got {q.dim()}, {k.dim()}, {v.dim()}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"flash_attention: q [*, H, Lq, D], k [*, Hkv, Lk, D], v [*, Hkv, Lk, Dv] do not agree: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dim() >= 4 and (k.shape[-3] == 0 or q.shape[-3] % k.shape[-3] != 0):
        raise ValueError(f"flash_attention: query heads ({q.shape[-3]}) must be a multiple of kv heads ({k.shape[-3]})")
    for name, extra in (("bias", bias), ("mask", mask)):
        if extra is not None and not _broadcasts_to(extra, _score_shape(q, k)):
            raise ValueError(f"flash_attention: {name} of shape {tuple(extra.shape)} does not broadcast to the "
                             f"scores {tuple(_score_shape(q, k))}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"flash_attention: mask must be bool (True keeps), got {mask.dtype}")


def _broadcasts_to(tensor, shape) -> bool:
    """Whether `tensor` expands to `shape` (the scores: a bias that would enlarge them is not taken)."""
    if tensor.dim() > len(shape):
        return False
    return all(size in (1, want) for size, want in zip(reversed(tensor.shape), reversed(shape)))


def _check_dropout(dropout_p, seed) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError("flash_attention: dropout needs a seed, an int64 tensor of one element")


def _check_device(q) -> None:
    if q.device.type != "cuda" and not _interpreted():
        raise RuntimeError(f"kitsune::flash_attention runs Triton kernels: it needs CUDA tensors (got {q.device}), "
                           f"or TRITON_INTERPRET=1 set before Triton is imported")


def _out_shape(q, v):
    return (*q.shape[:-1], v.shape[-1])


def _score_shape(q, k):
    return (*q.shape[:-1], k.shape[-2])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _as_4d(tensor: torch.Tensor) -> torch.Tensor:
    """[Z, H, L, D]: 3-D inputs get one head, leading batch dimensions are flattened (a view where strides allow)."""
    if tensor.dim() == 3:
        return tensor.unsqueeze(1)
    return tensor if tensor.dim() == 4 else tensor.flatten(0, -4)


class _Problem:
    """One call's tensors as the kernels see them: 4-D views, bias and mask expanded
    to the scores (stride 0 where broadcast), the sizes and the flags."""

    def __init__(self, q, k, v, bias, mask, mask_fill, scale, causal, dropout_p=0.0, seed=None):
        scores = _score_shape(q, k)
        self.q, self.k, self.v = _as_4d(q), _as_4d(k), _as_4d(v)
        self.bias = None if bias is None else _as_4d(bias.expand(scores))
        # bool is read as bytes: the same memory, a pointer type every Triton version loads
        self.mask = None if mask is None else _as_4d(mask.expand(scores)).view(torch.uint8)
        self.z, self.h, self.lq, self.d = self.q.shape
        self.hkv, self.lk, self.dv = self.k.shape[1], self.k.shape[2], self.v.shape[3]
        self.group = self.h // self.hkv
        self.mask_fill, self.scale, self.causal = float(mask_fill), float(scale), bool(causal)
        self.dropout_p = float(dropout_p)
        self.seed = seed if self.dropout_p > 0.0 else self.q  # a stand-in pointer, never read

    def extras(self):
        """(bias, mask, their 8 strides): a stand-in pointer (q) and zero strides where absent."""
        bias = self.bias if self.bias is not None else self.q
        mask = self.mask if self.mask is not None else self.q
        bias_strides = self.bias.stride() if self.bias is not None else (0, 0, 0, 0)
        mask_strides = self.mask.stride() if self.mask is not None else (0, 0, 0, 0)
        return bias, mask, (*bias_strides, *mask_strides)

    def flags(self) -> dict:
        # A finite fill makes masked future keys count (fill, not -inf): those tiles cannot be skipped.
        finite_fill = self.mask is not None and self.mask_fill != float("-inf")
        return dict(HAS_BIAS=self.bias is not None, HAS_MASK=self.mask is not None, CAUSAL=self.causal,
                    SKIP_FUTURE=self.causal and not finite_fill, DROPOUT=self.dropout_p > 0.0,
                    PRECISION="ieee" if self.q.dtype == torch.float32 else "tf32")

    def head_blocks(self):
        return _pow2(self.d), _pow2(self.dv)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _launch_forward(problem: _Problem, out, stats) -> None:
    from kitsune.ops.flash_attention_kernels import attention_forward_kernel
    from kitsune.ops.flash_attention_tuning import forward_blocks
    p = problem
    block_d, block_dv = p.head_blocks()
    block_m, block_n, warps, stages = forward_blocks(block_d, p.q.dtype, _interpreted())
    out4 = _as_4d(out)
    bias, mask, extra_strides = p.extras()
    grid = (triton_cdiv(p.lq, block_m), p.z * p.h)
    attention_forward_kernel[grid](
        p.q, p.k, p.v, bias, mask, out4, stats, p.seed,
        *p.q.stride(), *p.k.stride(), *p.v.stride(), *out4.stride(), *extra_strides,
        p.h, p.group, p.lq, p.lk, p.d, p.dv, p.scale, p.mask_fill, p.dropout_p, **p.flags(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps, num_stages=stages)


def _launch_backward(problem: _Problem, grad_out, out, stats, dq, dk, dv, bias_grad):
    """Fills dq, dk, dv; returns the float32 score gradients [Z, H, Lq, Lk] when bias_grad, else None."""
    from kitsune.ops import flash_attention_kernels as kernels
    from kitsune.ops.flash_attention_tuning import backward_blocks
    p = problem
    block_d, block_dv = p.head_blocks()
    blocks = backward_blocks(block_d, p.q.dtype, _interpreted())
    out4, grad4, dq4, dk4, dv4 = (_as_4d(t) for t in (out, grad_out, dq, dk, dv))
    delta = torch.empty((p.z, p.h, p.lq), dtype=torch.float32, device=p.q.device)
    kernels.attention_delta_kernel[(triton_cdiv(p.lq, blocks.delta_m), p.z * p.h)](
        out4, grad4, delta, p.h, p.lq, p.dv, *out4.stride(), *grad4.stride(),
        BLOCK_M=blocks.delta_m, BLOCK_DV=block_dv)
    # zeros: causal programs skip the future scores, whose gradient is 0
    scores = torch.zeros((p.z, p.h, p.lq, p.lk), dtype=torch.float32, device=p.q.device) if bias_grad else None
    bias, mask, extra_strides = p.extras()
    flags = p.flags()
    common = (*p.q.stride(), *p.k.stride(), *p.v.stride(), *grad4.stride(), *extra_strides)
    kernels.attention_dkdv_kernel[(triton_cdiv(p.lk, blocks.kv_n), p.z * p.hkv)](
        p.q, p.k, p.v, bias, mask, grad4, stats, delta, p.seed, dk4, dv4, scores if bias_grad else delta,
        *common, *dk4.stride(), *dv4.stride(),
        p.h, p.hkv, p.group, p.lq, p.lk, p.d, p.dv, p.scale, p.mask_fill, p.dropout_p, **flags,
        STORE_DBIAS=bias_grad,
        BLOCK_M=blocks.kv_m, BLOCK_N=blocks.kv_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=blocks.warps, num_stages=blocks.stages)
    kernels.attention_dq_kernel[(triton_cdiv(p.lq, blocks.q_m), p.z * p.h)](
        p.q, p.k, p.v, bias, mask, grad4, stats, delta, p.seed, dq4,
        *common, *dq4.stride(),
        p.h, p.group, p.lq, p.lk, p.d, p.dv, p.scale, p.mask_fill, p.dropout_p, **flags,
        BLOCK_M=blocks.q_m, BLOCK_N=blocks.q_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=blocks.warps, num_stages=blocks.stages)
    return scores


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
