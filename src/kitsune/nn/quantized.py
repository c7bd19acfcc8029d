"""`QuantizedLinear`: an `nn.Linear` whose weight is stored quantized (int8, int4 or
int2 with per-group scales, RTN) and whose forward is `kitsune::quantized_linear`
(kitsune.quantize.ops): dequantise in the matmul's prologue, bias and activation
in its epilogue (spec 04's QuantizedMatmul / QuantizedMatmulActivation).

    layer = QuantizedLinear.from_linear(linear, bits=4, group_size=128)
    y = layer(x)                                  # (..., in) -> (..., out), x's dtype
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(x.dtype), layer.bias))

State: buffers `qweight` (packed uint8 codes), `scales`, `zeros` (asymmetric only)
and the parameter `bias`; `.to(torch.bfloat16)` converts scales, zeros and bias,
never the codes. Inference of the weight only: the gradient flows to the input
(and the bias), the quantized weight has none.
"""
from __future__ import annotations

import torch
from torch import nn

from kitsune.quantize.ops import quantized_linear_op
from kitsune.quantize.packing import (check_bits, check_group_size, dequantize, num_groups, per_byte,
                                      quantize_rtn)

ACTIVATIONS = (None, "relu", "gelu", "silu")


def default_symmetric(bits: int) -> bool:
    """int8 is symmetric by default (its range is wide enough), int4 and int2 asymmetric
    (a zero point per group recovers a level that a skewed group would waste)."""
    return bits == 8


class QuantizedLinear(nn.Module):
    """A linear layer with an RTN-quantized weight; build it with `from_linear`.

    in_features, out_features, bias: as `nn.Linear`.
    bits:        8, 4 (two codes a byte) or 2 (four a byte).
    group_size:  weight columns (along `in`) sharing one scale (and zero point); the last
                 group of a row may be shorter.
    symmetric:   no zero points (None: True for 8 bits, False for 4 and 2).
    activation:  None, "relu", "gelu" (exact) or "silu", applied after the bias.
    dtype:       of scales, zero points and bias (default: torch's default dtype).
    A layer built directly holds zero codes (a zero weight) until a state dict is loaded.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int = 128, symmetric: bool | None = None, activation: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.bits, self.group_size = check_bits(bits), check_group_size(group_size)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QuantizedLinear: {name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"QuantizedLinear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.symmetric = default_symmetric(bits) if symmetric is None else bool(symmetric)
        dtype = dtype or torch.get_default_dtype()
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // per_byte(bits)),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        zeros = None if self.symmetric else torch.zeros(out_features, groups, dtype=dtype, device=device)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if self.symmetric:  # zero codes would mean -2**(bits-1) * scale: start from a zero weight
            self.qweight.fill_(_zero_code_byte(bits))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, symmetric: bool | None = None,
                    activation: str | None = None) -> "QuantizedLinear":
        """Quantise `linear`'s weight (RTN); its bias is copied. Scales take the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                    group_size=group_size, symmetric=symmetric, activation=activation, device=weight.device,
                    dtype=weight.dtype if weight.dtype != torch.float64 else torch.float32)
        packed = quantize_rtn(weight, layer.bits, layer.group_size, layer.symmetric, scale_dtype=layer.scales.dtype)
        with torch.no_grad():
            layer.qweight.copy_(packed.codes)
            layer.scales.copy_(packed.scales)
            if packed.zeros is not None:
                layer.zeros.copy_(packed.zeros)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear_op(x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size,
                                   self.in_features, self.activation or "none")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight `[out, in]` the forward multiplies x of `dtype` with
        (default: the scales' dtype)."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features,
                          dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"activation={self.activation}")


def _zero_code_byte(bits: int) -> int:
    """The byte whose every code is the symmetric zero point 2**(bits-1)."""
    byte, code = 0, 2 ** (bits - 1)
    for i in range(per_byte(bits)):
        byte |= code << (i * bits)
    return byte
