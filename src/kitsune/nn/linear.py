"""`FusedLinear`: `act(F.linear(x, weight, bias))` as one `kitsune::fused_linear` op
(the matmul, then bias and activation in one generated kernel), with nn.Linear's
parameters, initialisation and state-dict keys."""
from __future__ import annotations

import torch
from torch import nn

from kitsune.nn._util import autocast_dtype, cast, check_positive_int, linear_parameters, reset_linear
from kitsune.ops.fused_ops import activation_name, linear


class FusedLinear(nn.Module):
    """nn.Linear followed by an activation (None, "relu", "gelu", "gelu_tanh", "silu",
    "sigmoid", "tanh"): `weight` [out_features, in_features], `bias` [out_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features", "FusedLinear", allow_zero=True)
        self.out_features = check_positive_int(out_features, "out_features", "FusedLinear", allow_zero=True)
        self.activation = activation_name(activation, "FusedLinear: activation")
        linear_parameters(self, in_features, out_features, bias, "FusedLinear", device, dtype)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        reset_linear(self)

    @classmethod
    def from_module(cls, linear: nn.Linear, activation: str | None = None) -> "FusedLinear":
        """A FusedLinear sharing `linear`'s parameters (its trained weights)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedLinear.from_module: linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
                    device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast: the dtype nn.Linear would compute in
        x, weight, bias = cast((x, self.weight, self.bias), autocast_dtype(x))
        return linear(x, weight, bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")
