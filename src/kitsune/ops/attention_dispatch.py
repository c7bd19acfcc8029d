"""Which implementation computes an `attention(...)` call: Kitsune's flash kernel
(kitsune.ops.flash_attention) or the reference (SDPA where exact, the formula
otherwise), chosen by measuring both once per configuration.

A configuration is what changes the time and not the values: the shapes of q, k
and v, their layout class (stride order, broadcast dimensions), the bias's and
the mask's broadcast pattern, the dtype, causal, whether the fill is finite, dropout,
and whether gradients are wanted (then forward + backward is timed). Each is timed
once per process on random tensors of those shapes (kitsune.capture.timing),
outside any fake mode or tracing (AOTAutograd calls `attention` with
FakeTensors: the choice is then made on real tensors of the same shapes), and
kept in `attention_choices()` for reports; the choice and both times are logged
at INFO on logger "kitsune".

KITSUNE_ATTENTION=auto (the default) measures; `triton` always runs the kernel
where it supports the call (on CPU tensors too, under TRITON_INTERPRET=1: the
tests); `sdpa` always runs the reference. CPU tensors run the reference unless
forced; calls the kernel does not support run the reference with the reason
logged once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

log = logging.getLogger("kitsune")

MODES = ("auto", "triton", "sdpa")
TRITON, REFERENCE = "triton", "sdpa"

# config -> (choice, kitsune ms, reference ms); nan where a side was not timed
_CHOICES: dict[tuple, tuple[str, float, float]] = {}
_REASONS_LOGGED: set[str] = set()


def attention_choices() -> dict[tuple, tuple[str, float, float]]:
    """Every measured configuration of this process: config -> (choice, kitsune_ms, sdpa_ms)."""
    return dict(_CHOICES)


def attention_mode() -> str:
    mode = os.environ.get("KITSUNE_ATTENTION", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"KITSUNE_ATTENTION must be one of {MODES}, got {mode!r}")
    return mode


def choose_implementation(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, reference) -> str:
    """TRITON or REFERENCE for this call; `reference(q, k, v, bias, mask, mask_fill, scale, causal, dropout_p)`
    is what the measurement times against."""
    mode = attention_mode()
    if mode == REFERENCE:
        return REFERENCE
    if q.device.type != "cuda" and mode != TRITON:
        return REFERENCE
    from kitsune.ops.flash_attention import unsupported
    why_not = unsupported(q, k, v, bias, mask, dropout_p)
    if why_not is not None:
        _log_once(f"attention runs the reference: {why_not}")
        return REFERENCE
    if mode == TRITON:
        return TRITON
    if _symbolic(q, k, v, bias, mask):
        _log_once("attention runs the reference: symbolic shapes cannot be measured")
        return REFERENCE
    key = config_key(q, k, v, bias, mask, mask_fill, causal, dropout_p)
    if key not in _CHOICES and _dynamo_tracing():  # Dynamo tracing this Python: nothing may run for real
        _log_once("attention runs the reference: called while Dynamo traces, with no measurement cached")
        return REFERENCE
    if key not in _CHOICES:
        _CHOICES[key] = _measure(key, q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, reference)
    return _CHOICES[key][0]


def config_key(q, k, v, bias, mask, mask_fill, causal, dropout_p=0.0) -> tuple:
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    finite_fill = mask is not None and mask_fill != float("-inf")
    scores = (*q.shape[:-1], k.shape[-2])
    extras = tuple(None if t is None else (_layout(t, len(scores)), t.dtype) for t in (bias, mask))
    return (tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(_layout(t, t.dim()) for t in (q, k, v)), extras,
            q.dtype, bool(causal), finite_fill, dropout_p > 0.0, training)


def describe(key: tuple) -> str:
    """A configuration in a line: shapes, dtype and flags."""
    q_shape, k_shape, v_shape, _, extras, dtype, causal, finite_fill, dropout, training = key
    flags = [name for name, on in (("bias", extras[0] is not None), ("mask", extras[1] is not None),
                                   ("causal", causal), ("finite fill", finite_fill), ("dropout", dropout),
                                   ("fwd+bwd", training)) if on]
    return f"q {list(q_shape)} k {list(k_shape)} v {list(v_shape)} {str(dtype).replace('torch.', '')} {' '.join(flags)}"


def _layout(tensor: torch.Tensor, rank: int) -> tuple:
    """The stride class of `tensor` broadcast to `rank` dimensions (computed, not expanded: no op
    is recorded while tracing): which dimensions are broadcast, their order by stride, a unit last stride."""
    pad = rank - tensor.dim()
    shape, strides = (1,) * pad + tuple(tensor.shape), (0,) * pad + tuple(tensor.stride())
    broadcast = tuple(st == 0 or size == 1 for size, st in zip(shape, strides))
    order = tuple(sorted(range(rank), key=lambda i: -strides[i]))
    return broadcast, order, strides[-1] == 1 if strides else True


def _dynamo_tracing() -> bool:
    from kitsune._compat import dynamo_compiling
    return dynamo_compiling()


def _symbolic(*tensors) -> bool:
    return any(t is not None and not all(isinstance(s, int) for s in (*t.shape, *t.stride())) for t in tensors)


def _measure(key, q, k, v, bias, mask, mask_fill, scale, causal, dropout_p, reference) -> tuple[str, float, float]:
    """(choice, kitsune ms, reference ms), timed on real random tensors of the call's shapes."""
    from kitsune.capture.timing import MIN_GAIN
    from kitsune.ops.flash_attention import flash_attention
    training = key[-1]
    with real_tensors():
        inputs = [_random(t, grad=training and t.requires_grad) if t is not None else None
                  for t in (q, k, v, bias, mask)]
        try:
            reference_ms = _time(lambda *a: reference(*a, mask_fill, scale, causal, dropout_p), inputs, training)
        except Exception as error:  # noqa: BLE001 - the reference is what runs anyway
            log.info("attention %s: the reference failed to run (%s); the kernel runs", describe(key), error)
            return TRITON, math.nan, math.nan
        try:
            kitsune_ms = _time(lambda q_, k_, v_, b_, m_: flash_attention(
                q_, k_, v_, bias=b_, mask=m_, mask_fill=mask_fill, scale=scale, causal=causal,
                dropout_p=dropout_p), inputs, training)
        except Exception as error:  # noqa: BLE001 - a kernel that fails to compile or launch is not chosen
            log.info("attention %s: the kernel failed (%s: %s); the reference runs", describe(key),
                     type(error).__name__, error)
            return REFERENCE, math.nan, reference_ms
        disagreement = _disagreement(inputs, mask_fill, scale, causal, reference)
    if disagreement is not None:
        log.warning("attention %s: the kernel's result differs from the reference's (%s); the reference runs",
                    describe(key), disagreement)
        return REFERENCE, kitsune_ms, reference_ms
    choice = TRITON if kitsune_ms < MIN_GAIN * reference_ms else REFERENCE
    log.info("attention %s: %s (kitsune %.3f ms, sdpa/reference %.3f ms)", describe(key), choice, kitsune_ms,
             reference_ms)
    return choice, kitsune_ms, reference_ms


# Relative L2 error allowed between the kernel and the reference on the measured inputs
# (16-bit: both round the probabilities to the input dtype before the second product).
AGREEMENT = {torch.float16: 2e-2, torch.bfloat16: 3e-2, torch.float32: 1e-3, torch.float64: 1e-6}


def _disagreement(inputs, mask_fill, scale, causal, reference) -> str | None:
    """Why the kernel's forward result is not the reference's on `inputs` (without dropout), or
    None: a kernel is chosen only where it was seen computing the same function."""
    from kitsune.ops.flash_attention import flash_attention
    q, k, v, bias, mask = inputs
    with torch.no_grad():
        want = reference(q, k, v, bias, mask, mask_fill, scale, causal, 0.0).double()
        got = flash_attention(q, k, v, bias=bias, mask=mask, mask_fill=mask_fill, scale=scale, causal=causal,
                              dropout_p=0.0).double()
    if got.shape != want.shape or not torch.equal(got.isnan(), want.isnan()):
        return "shapes or NaN positions differ"
    got, want = got.nan_to_num(), want.nan_to_num()
    error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    allowed = AGREEMENT.get(q.dtype, 1e-3)
    return None if error <= allowed else f"relative error {error:.2e} > {allowed:.0e}"


def _time(fn, inputs, training) -> float:
    from kitsune.capture.timing import time_ms
    if not training:
        with torch.no_grad():
            return time_ms(lambda: fn(*inputs))
    with torch.enable_grad():
        grad = torch.randn_like(fn(*inputs))
        return time_ms(lambda: fn(*inputs).backward(grad))


def _random(tensor: torch.Tensor, grad: bool) -> torch.Tensor:
    """A real tensor like `tensor` (shape, strides, dtype, device): broadcast dimensions stay stride 0,
    a bool mask keeps about 90 % (no row fully masked in practice)."""
    from kitsune.capture.timing import random_like
    if any(st == 0 for st in tensor.stride()):
        compact = [1 if st == 0 else size for size, st in zip(tensor.shape, tensor.stride())]
        base = _random(torch.empty(compact, dtype=tensor.dtype, device=tensor.device), grad=grad)
        return base.expand(tensor.shape)
    if tensor.dtype == torch.bool:
        return torch.rand(tensor.shape, device=tensor.device) < 0.9
    return random_like(tensor).requires_grad_(grad)


@contextlib.contextmanager
def real_tensors():
    """Outside every dispatch mode (AOTAutograd's FakeTensor, proxy tracing, functionalization):
    what runs here is real, neither faked nor recorded in the traced graph."""
    from kitsune._compat import disable_dispatch_modes, unset_fake_temporarily
    with unset_fake_temporarily(), disable_dispatch_modes():
        yield


def _log_once(message: str) -> None:
    if message not in _REASONS_LOGGED:
        _REASONS_LOGGED.add(message)
        log.info(message)
