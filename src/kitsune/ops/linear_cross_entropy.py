"""The fused LM-head loss: `F.cross_entropy(F.linear(hidden, weight, bias), target)`
computed a chunk of rows at a time, so that the [N, V] logits tensor never exists
whole (as Liger-Kernel's fused linear cross-entropy does).

Why: a language model's head maps N tokens of width H to V logits. For GPT-2
(V = 50257) at 8 x 1024 tokens the logits are 0.8 GB in bf16, their float32 copy
for the loss 1.6 GB, and the gradient of the logits as much again, while the
hidden states are 12 MB. Here each chunk of rows computes its logits (in the
matmul dtype, upcast to float32 as eager's loss does), its loss, and straight
away the gradient of its logits for a loss gradient of 1:

    softmax(z) - (1 - eps) * onehot(target) - eps / V     (zero on ignored rows)

scaled for the reduction, and from it the chunk's share of every gradient:
grad_hidden = g @ W, grad_weight += g^T @ hidden (float32), grad_bias += sum(g).
The backward then only multiplies the saved gradients by the loss's gradient.

`kitsune::linear_cross_entropy` is a `torch.library` custom op (one node in an
aten graph, a fake implementation for tracing, autograd, autocast);
`linear_cross_entropy(...)` is the function to call by hand, and
`kitsune.capture.lm_head` rewrites a captured `linear -> cross_entropy` into it.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("kitsune")

# Rows per chunk never exceed this: the chunk's float32 logits stay bounded even
# when H is large next to V (where the size rule alone would take every row).
MAX_CHUNK_ROWS = 4096
# Nor are a chunk's logits fewer elements than this (2 MB of float32), where the size rule
# would make chunks of a few rows (small H): each chunk launches a dozen ops, and on
# the CPU a chunk of 4 rows x 8192 classes takes as long as 64 rows (2 cores, N=512,
# H=64: 1.6 s with 4-row chunks, 0.27 s with 64, eager 0.27 s).
MIN_CHUNK_LOGITS = 1 << 19
# On a GPU a chunk has at least this many rows (or all of them): every chunk reads and writes
# the [V, H] float32 weight-gradient sum, and its GEMM has the chunk's rows as its inner
# dimension. An H100 run (2026-12-07, N=8192, H=768, V=50257, 64 chunks of 128 rows) took
# 35.9 ms against eager's 22.0 ms for the loss's forward and backward, 64 passes over that
# 154 MB sum being some 6 ms of it; 1024 rows make 8 chunks of 206 MB of float32 logits each.
MIN_CHUNK_ROWS_GPU = 1024
# Devices where the vocabulary is padded to 16 bytes for the GEMMs (cuBLAS runs misaligned
# leading dimensions in slow kernels: GPT-2's whole logits product took 3.3 ms against 0.45 ms
# padded, kitsune.runtime.matmul); the pad rows of the weight are zero and never reach the loss.
PAD_VOCAB_DEVICES = ("cuda",)

REDUCTIONS = ("mean", "sum")
_EMPTY = (0,)


def chunk_rows(rows: int, vocab: int, width: int, gpu: bool = False) -> int:
    """Rows per chunk such that a chunk's float32 logits are about the size of the
    hidden states (Liger-Kernel's rule: next power of two of ceil(N / ceil(V / H))),
    and at least MIN_CHUNK_LOGITS elements (on a GPU at least MIN_CHUNK_ROWS_GPU rows);
    at least 1 and at most MAX_CHUNK_ROWS."""
    factor = max(1, -(-vocab // max(width, 1)))
    wanted = max(1, -(-rows // factor), -(-MIN_CHUNK_LOGITS // max(vocab, 1)))
    if gpu:
        wanted = max(wanted, min(rows, MIN_CHUNK_ROWS_GPU))
    return min(1 << (wanted - 1).bit_length(), MAX_CHUNK_ROWS)


@torch.library.custom_op("kitsune::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            target: torch.Tensor, ignore_index: int, label_smoothing: float, reduction: str,
                            compute_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) of
    `F.cross_entropy(hidden @ weight.T + bias, target, ignore_index=..., label_smoothing=..., reduction=...)`.
    The loss is float32 (float64 for float64 inputs); the gradients are those of a loss gradient
    of 1, in the dtypes of hidden, weight and bias (empty tensors where compute_grads is False,
    and grad_bias where bias is None)."""
    _check_op_arguments(hidden, weight, bias, target, label_smoothing, reduction)
    # The casts autocast asks for were made before this op (see _autocast_kernel); inside it,
    # float32 must stay float32 (the weight gradient's accumulator).
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked_loss(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, compute_grads)


@linear_cross_entropy_op.register_fake
def _fake(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, compute_grads):
    _check_op_arguments(hidden, weight, bias, target, label_smoothing, reduction)
    loss = hidden.new_empty((), dtype=_accumulator_dtype(hidden.dtype))
    if not compute_grads:
        return loss, hidden.new_empty(_EMPTY), weight.new_empty(_EMPTY), hidden.new_empty(_EMPTY)
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(_EMPTY)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _check_op_arguments(hidden, weight, bias, target, label_smoothing, reduction) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"linear_cross_entropy: hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, H] with H = {hidden.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be [V] with V = {weight.shape[0]}, "
                         f"got shape {tuple(bias.shape)}")
    if target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: target must be [N] with N = {hidden.shape[0]}, "
                         f"got shape {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise TypeError(f"linear_cross_entropy: target must hold class indices (int64), got {target.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"linear_cross_entropy: hidden, weight and bias must have one dtype, got "
                        f"{hidden.dtype}, {weight.dtype}, {None if bias is None else bias.dtype}")


def _chunked_loss(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, compute_grads):
    rows, width = hidden.shape
    vocab = weight.shape[0]
    valid = target != ignore_index
    # PyTorch's mean counts the rows not ignored; the gradient of a row is scaled by 1/count
    # (inf when every row is ignored: those rows' gradients are zero anyway, the loss nan).
    accumulator = _accumulator_dtype(hidden.dtype)
    count = valid.sum().to(accumulator)
    scale = 1.0 / count if reduction == "mean" else torch.ones((), dtype=accumulator, device=hidden.device)
    padded_weight, padded_bias = _padded_vocabulary(weight, bias)
    grads = _GradientSums(hidden, padded_weight, padded_bias, accumulator, vocab) if compute_grads else None
    loss_sum = torch.zeros((), dtype=accumulator, device=hidden.device)
    step = chunk_rows(rows, vocab, width, gpu=hidden.device.type != "cpu")
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        chunk_loss = _chunk(hidden[start:stop], padded_weight, padded_bias, target[start:stop], valid[start:stop],
                            label_smoothing, scale, grads, start, vocab)
        loss_sum += chunk_loss
    loss = loss_sum / count if reduction == "mean" else loss_sum
    if grads is None:  # three distinct empty tensors: a custom op's outputs never alias
        return loss, hidden.new_empty(_EMPTY), weight.new_empty(_EMPTY), hidden.new_empty(_EMPTY)
    return (loss, *grads.results())


def _padded_vocabulary(weight, bias):
    """weight [V, H] and bias [V] with zero rows added up to a 16-byte multiple of V (on
    PAD_VOCAB_DEVICES), so that every GEMM of the loss has aligned leading dimensions;
    as they are elsewhere or where V is aligned already."""
    vocab = weight.shape[0]
    step = 16 // weight.element_size()
    padded = -(-vocab // step) * step
    if weight.device.type not in PAD_VOCAB_DEVICES or padded == vocab:
        return weight, bias
    grown = weight.new_zeros((padded, weight.shape[1]))
    grown[:vocab].copy_(weight)
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(padded - vocab)])
    return grown, bias


def _chunk(hidden, weight, bias, target, valid, label_smoothing, scale, grads, start, vocab):
    """The summed loss of one chunk of rows; adds the chunk's gradients to `grads`. `weight`
    may have more rows than the `vocab` classes (_padded_vocabulary): their logits are left
    out of the loss and their gradient is zero."""
    logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else torch.mm(hidden, weight.t())
    # eager's loss upcasts low-precision logits; the same tensor when they are float32 or float64
    full = logits.to(_accumulator_dtype(logits.dtype))
    del logits
    z = full[:, :vocab] if full.shape[1] != vocab else full
    safe_target = torch.where(valid, target, 0).unsqueeze(1)
    row_loss = -(1.0 - label_smoothing) * z.gather(1, safe_target).squeeze(1)
    if label_smoothing:
        # PyTorch's smoothing: (1-eps) * nll + eps/V * sum_c(-log p_c) = lse - (1-eps) z_t - eps * mean(z)
        row_loss -= label_smoothing * z.mean(dim=1)
    row_max = z.amax(dim=1, keepdim=True)
    probs = z.sub_(row_max).exp_()  # exp(z - max) in place of the logits: one chunk in memory
    row_sum = probs.sum(dim=1, keepdim=True)
    row_loss += (row_max + row_sum.log()).squeeze(1)  # + logsumexp(z)
    chunk_loss = torch.where(valid, row_loss, 0.0).sum()
    if grads is not None:
        row_scale = torch.where(valid, scale, 0.0).unsqueeze(1)
        grad = probs.mul_(row_scale / row_sum)  # softmax, scaled for the reduction (0 on ignored rows)
        if label_smoothing:
            grad.sub_(row_scale * (label_smoothing / vocab))
        grad.scatter_add_(1, safe_target, row_scale * -(1.0 - label_smoothing))
        if full is not z:
            full[:, vocab:].zero_()  # the pad classes: no gradient
        grads.add(full, hidden, weight, start)
    return chunk_loss


class _GradientSums:
    """The gradients of a loss gradient of 1, filled chunk by chunk: rows of grad_hidden,
    and float32 (float64) sums for the weight and bias."""

    def __init__(self, hidden, weight, bias, accumulator, vocab):
        self.grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        self.weight_dtype, self.vocab = weight.dtype, vocab
        self.grad_weight = torch.zeros(weight.shape, dtype=accumulator, device=weight.device)
        self.bias = bias
        self.grad_bias = torch.zeros(weight.shape[0], dtype=accumulator, device=weight.device)

    def add(self, grad, hidden, weight, start):
        """grad: the float32 (float64) gradient of one chunk's logits, rows start.. of hidden."""
        low = grad.to(weight.dtype)  # the matmuls run in the dtype of the logits, as eager's do
        torch.mm(low, weight, out=self.grad_hidden[start:start + grad.shape[0]])
        _accumulate_outer(self.grad_weight, grad, low, hidden)
        if self.bias is not None:
            self.grad_bias += grad.sum(dim=0)

    def results(self):
        # no copy when it is the dtype already and the vocabulary was not padded
        grad_weight = self._unpadded(self.grad_weight).to(self.weight_dtype)
        if self.bias is None:
            return self.grad_hidden, grad_weight, self.grad_hidden.new_empty(_EMPTY)
        return self.grad_hidden, grad_weight, self._unpadded(self.grad_bias).to(self.bias.dtype)

    def _unpadded(self, total):
        """The rows of the real classes (a copy, not a view into the padded sum)."""
        return total if total.shape[0] == self.vocab else total[:self.vocab].clone()


def _accumulate_outer(total, grad, low, hidden) -> None:
    """total (float32 [V, H]) += grad^T @ hidden. In float32 on the CPU and for float32 inputs.
    On a GPU in low precision the product runs in that precision and accumulates into the
    float32 sum in place (`addmm` with `out_dtype`, tensor cores, no [V, H] temporary) where
    torch has it: a float32 GEMM there is an order of magnitude slower."""
    if hidden.dtype == total.dtype:
        total.addmm_(grad.t(), hidden)
        return
    if hidden.device.type == "cuda" and _ADDMM_OUT_DTYPE is not None:
        try:
            _ADDMM_OUT_DTYPE(total, low.t(), hidden, torch.float32, out=total)
            return
        except RuntimeError as error:  # an older torch without the CUDA kernel
            log.debug("linear_cross_entropy: addmm with out_dtype failed (%s); float32 product", error)
    total.addmm_(grad.t(), hidden.float())


# torch.addmm(total, a, b, out_dtype=float32, out=total) where torch has it
_ADDMM_OUT_DTYPE = getattr(torch.ops.aten.addmm, "dtype_out", None)


def _accumulator_dtype(dtype):
    """The dtype the loss and the gradient sums are computed in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _backward(ctx, grad_loss, *unused):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    if not ctx.compute_grads:
        raise RuntimeError("kitsune::linear_cross_entropy was called with compute_grads=False and cannot be "
                           "differentiated; call kitsune.ops.linear_cross_entropy instead")
    # the loss is a scalar: every gradient is the saved one times the loss's gradient
    return (grad_hidden * grad_loss, grad_weight * grad_loss,
            grad_bias * grad_loss if ctx.has_bias else None, None, None, None, None, None)


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.has_bias = inputs[2] is not None
    ctx.compute_grads = inputs[7]
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_kernel(device_type):
    """Under autocast the op casts hidden, weight and bias to the autocast dtype, as
    `F.linear` does (`torch.library.register_autocast` casts to one fixed dtype, not the
    one the region asks for), then runs with autocast off."""
    def kernel(hidden, weight, bias, target, ignore_index, label_smoothing, reduction, compute_grads):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (_autocast_cast(t, device_type, dtype) for t in (hidden, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy_op(hidden, weight, bias, target, ignore_index, label_smoothing,
                                           reduction, compute_grads)
    return kernel


def _autocast_cast(tensor, device_type, dtype):
    if tensor is None or not tensor.is_floating_point() or tensor.device.type != device_type:
        return tensor
    return tensor.to(dtype)


_LIBRARY = torch.library.Library("kitsune", "IMPL")  # kept: its registrations live as long as it does
for _device in ("cpu", "cuda"):
    _LIBRARY.impl("linear_cross_entropy", _autocast_kernel(_device), "Autocast" + _device.upper())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: str = "mean", *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias), target, ignore_index=ignore_index,
    label_smoothing=label_smoothing, reduction=reduction)` without the [N, V] logits: hidden
    [N, H], weight [V, H], bias [V] or None, target [N] class indices; reduction "mean" or "sum".
    The logits are upcast to float32 for the loss (as eager's loss does); `dtype` is the loss's
    dtype, by default eager's: the logits' dtype, float32 under autocast (pass torch.float32
    for `F.cross_entropy(logits.float(), ...)`).
    Differentiable; the gradients are computed with the loss when anything requires grad."""
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"linear_cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or math.isnan(label_smoothing):
        raise TypeError(f"linear_cross_entropy: label_smoothing must be a float, got {label_smoothing!r}")
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    compute_grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    loss = linear_cross_entropy_op(hidden, weight, bias, target, ignore_index, float(label_smoothing),
                                   reduction, compute_grads)[0]
    return loss.to(dtype if dtype is not None else _loss_dtype(hidden))


def _loss_dtype(hidden):
    """The dtype eager's loss has: float32 under autocast (cross_entropy upcasts there),
    otherwise the dtype of the logits, which is hidden's."""
    if torch.is_autocast_enabled(hidden.device.type) and hidden.is_floating_point():
        return torch.float32
    return hidden.dtype
