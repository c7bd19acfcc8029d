"""`FusedLayerNorm` and `FusedRMSNorm`: nn.LayerNorm / nn.RMSNorm (same arguments,
defaults, parameters and state-dict keys) with an optional activation after the
norm, as one `kitsune::layer_norm` / `kitsune::rms_norm` op: the row statistics,
normalisation, affine and activation in generated kernels, forward and backward."""
from __future__ import annotations

import torch
from torch import nn

from kitsune.nn._util import autocast_dtype, cast
from kitsune.ops.fused_ops import activation_name, layer_norm_op, rms_norm_op


def _norm_input(x: torch.Tensor, params: tuple) -> tuple:
    """Under autocast the norms compute in float32, as eager's do (autocast's fp32 list)."""
    return cast((x, *params), torch.float32 if autocast_dtype(x) is not None else None)


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True) then
    `activation` (None, "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, activation: str | None = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.activation = activation_name(activation, "FusedLayerNorm: activation")

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, activation: str | None = None) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing `norm`'s parameters."""
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(f"FusedLayerNorm.from_module: norm must be an nn.LayerNorm, got {type(norm).__name__}")
        layer = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                    bias=norm.bias is not None, device="meta", activation=activation)
        layer.weight, layer.bias = norm.weight, norm.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight, bias = _norm_input(x, (self.weight, self.bias))
        return layer_norm_op(x, list(self.normalized_shape), weight, bias, float(self.eps), self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class FusedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True) then `activation`."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, activation: str | None = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)
        self.activation = activation_name(activation, "FusedRMSNorm: activation")

    @classmethod
    def from_module(cls, norm: nn.RMSNorm, activation: str | None = None) -> "FusedRMSNorm":
        """A FusedRMSNorm sharing `norm`'s parameters."""
        if not isinstance(norm, nn.RMSNorm):
            raise TypeError(f"FusedRMSNorm.from_module: norm must be an nn.RMSNorm, got {type(norm).__name__}")
        layer = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                    device="meta", activation=activation)
        layer.weight = norm.weight
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = _norm_input(x, (self.weight,))
        eps = None if self.eps is None else float(self.eps)
        return rms_norm_op(x, list(self.normalized_shape), weight, eps, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
