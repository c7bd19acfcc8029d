"""`kitsune::quantized_linear`: the weight-only quantized linear as a `torch.library`
custom op, so it is one node under `torch.compile` (any backend) and `torch.export`.

    quantized_linear(x, codes, scales, zeros, bias, bits, group_size, in_features, activation)
        = act(x @ dequantize(codes, scales, zeros).T + bias)      # x: (..., in) -> (..., out)

`codes`, `scales`, `zeros` are `packing.QuantizedWeight`'s (zeros None when
symmetric); `activation` is "none", "relu", "gelu" (exact, erf) or "silu". The
result has x's dtype; the weight is dequantised into x's dtype and the bias
rounded to it, as `F.linear(x, layer.dequantize(x.dtype), bias)` would.
Kernels: kitsune.quantize.dispatch (Triton on CUDA, the PyTorch path elsewhere);
a CUDA kernel that fails falls back to the PyTorch path, logged once.

Autograd: the gradient of x (and of the bias); the quantized weight is constant.
Autocast: x and the bias are cast to the region's dtype, as `F.linear`'s operands are.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from kitsune.quantize import dispatch
from kitsune.quantize.packing import SUPPORTED_BITS, dequantize, per_byte

log = logging.getLogger("kitsune")
_WARNED: set = set()
# Devices whose tensors go to the Triton kernels (tests add "cpu" under TRITON_INTERPRET=1).
TRITON_DEVICES = ("cuda",)


def check_arguments(x, codes, scales, zeros, bias, bits, group_size, in_features, activation) -> None:
    """ValueError naming the argument that does not fit."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantized_linear: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if activation not in dispatch.ACTIVATIONS:
        raise ValueError(f"quantized_linear: activation must be one of {dispatch.ACTIVATIONS}, got {activation!r}")
    if group_size < 1 or in_features < 1:
        raise ValueError(f"quantized_linear: group_size and in_features must be positive, got {group_size}, "
                         f"{in_features}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"quantized_linear: x must end in in_features={in_features}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantized_linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    width = in_features if codes.dtype == torch.int8 else -(-in_features // per_byte(bits))
    if codes.dim() != 2 or codes.dtype not in (torch.uint8, torch.int8) or codes.shape[1] != width:
        raise ValueError(f"quantized_linear: codes must be uint8 [out, {width}], got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    groups = -(-in_features // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and (tuple(t.shape) != (codes.shape[0], groups) or not t.is_floating_point()):
            raise ValueError(f"quantized_linear: {name} must be float [{codes.shape[0]}, {groups}], got "
                             f"{t.dtype} {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (codes.shape[0],):
        raise ValueError(f"quantized_linear: bias must be [{codes.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("codes", codes), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"quantized_linear: {name} is on {t.device}, x on {x.device}")


@torch.library.custom_op("kitsune::quantized_linear", mutates_args=())
def quantized_linear_op(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                        activation: str) -> torch.Tensor:
    """act(x @ W.T + bias) with W dequantised from (codes, scales, zeros); see the module docstring."""
    check_arguments(x, codes, scales, zeros, bias, bits, group_size, in_features, activation)
    n = codes.shape[0]
    if bias is not None:
        bias = bias.to(x.dtype)
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    args = (x2d, codes.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(), bias,
            bits, group_size, in_features, activation)
    out = None
    if x.device.type in TRITON_DEVICES:
        try:
            out = dispatch.gpu_quantized_linear(*args)
        except Exception as error:  # noqa: BLE001 - never crash the model: the PyTorch path runs
            key = (type(error).__name__, str(error)[:200])
            if key not in _WARNED:
                _WARNED.add(key)
                log.warning("kitsune::quantized_linear: the Triton kernel failed (%s: %s); the PyTorch path runs",
                            *key)
    if out is None:
        out = dispatch.torch_quantized_linear(*args)
    return out.reshape(*x.shape[:-1], n)


@quantized_linear_op.register_fake
def _fake(x, codes, scales, zeros, bias, bits, group_size, in_features, activation):
    check_arguments(x, codes, scales, zeros, bias, bits, group_size, in_features, activation)
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _setup_context(ctx, inputs, output):
    x, codes, scales, zeros, bias, bits, group_size, in_features, activation = inputs
    ctx.save_for_backward(x, codes, scales, zeros, bias)
    ctx.meta = (bits, group_size, in_features, activation)


def _backward(ctx, grad_out):
    x, codes, scales, zeros, bias = ctx.saved_tensors
    bits, group_size, in_features, activation = ctx.meta
    weight = dequantize(codes, scales, zeros, bits, group_size, in_features, x.dtype)
    grad_pre = grad_out
    if activation != "none":  # recompute the pre-activation rather than keep it
        with torch.enable_grad():
            pre = F.linear(x.detach(), weight, None if bias is None else bias.to(x.dtype)).requires_grad_()
            grad_pre, = torch.autograd.grad(dispatch.apply_activation(pre, activation), pre, grad_out)
    grad_x = grad_pre @ weight if ctx.needs_input_grad[0] else None
    grad_bias = None
    if bias is not None and ctx.needs_input_grad[4]:
        grad_bias = grad_pre.reshape(-1, grad_pre.shape[-1]).sum(0).to(bias.dtype)
    return grad_x, None, None, None, grad_bias, None, None, None, None


quantized_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_kernel(device_type):
    """Under autocast x (and the bias) are cast to the autocast dtype, as `F.linear` casts its
    operands, and the op runs with autocast off; the weight is dequantised into that dtype."""
    def kernel(x, codes, scales, zeros, bias, bits, group_size, in_features, activation):
        dtype = torch.get_autocast_dtype(device_type)
        if x.is_floating_point() and x.device.type == device_type:
            x = x.to(dtype)
        if bias is not None and bias.device.type == device_type:
            bias = bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return quantized_linear_op(x, codes, scales, zeros, bias, bits, group_size, in_features, activation)
    return kernel


_LIBRARY = torch.library.Library("kitsune", "IMPL")  # kept: its registrations live as long as it does
for _device in ("cpu", "cuda"):
    _LIBRARY.impl("quantized_linear", _autocast_kernel(_device), "Autocast" + _device.upper())


def quantized_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, *, bits: int = 4, group_size: int = 128,
                     in_features: int | None = None, activation: str | None = None) -> torch.Tensor:
    """`torch.ops.kitsune.quantized_linear` with defaults: `in_features` defaults to x's last
    dimension, `activation` None means none."""
    return quantized_linear_op(x, codes, scales, zeros, bias, bits, group_size,
                               x.shape[-1] if in_features is None else in_features, activation or "none")
