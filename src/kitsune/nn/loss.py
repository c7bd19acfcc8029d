"""Fused losses: `FusedSoftmaxCrossEntropy` (nn.CrossEntropyLoss as one
`kitsune::softmax_cross_entropy` op: log-softmax, the picked class, smoothing and
the reduction in generated kernels) and `FusedLinearCrossEntropy` (an LM head and
its loss, `kitsune::linear_cross_entropy`: the [N, V] logits never exist whole)."""
from __future__ import annotations

import torch
from torch import nn

from kitsune.nn._util import autocast_dtype, check_positive_int, check_probability, linear_parameters, reset_linear
from kitsune.ops.fused_ops import REDUCTIONS, softmax_cross_entropy_op
from kitsune.ops.linear_cross_entropy import REDUCTIONS as LINEAR_REDUCTIONS
from kitsune.ops.linear_cross_entropy import linear_cross_entropy


def _check_ignore_index(value, layer: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{layer}: ignore_index must be an int, got {type(value).__name__}")
    return value


class FusedSoftmaxCrossEntropy(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss(weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0)
    (its `weight` buffer and state-dict keys). Class-index targets run the fused op;
    class-probability targets run F.cross_entropy."""

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0):
        if reduction not in REDUCTIONS:
            raise ValueError(f"FusedSoftmaxCrossEntropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        super().__init__(weight, size_average, _check_ignore_index(ignore_index, "FusedSoftmaxCrossEntropy"),
                         reduce, reduction, check_probability(label_smoothing, "label_smoothing",
                                                              "FusedSoftmaxCrossEntropy"))

    @classmethod
    def from_module(cls, loss: nn.CrossEntropyLoss) -> "FusedSoftmaxCrossEntropy":
        if not isinstance(loss, nn.CrossEntropyLoss):
            raise TypeError(f"FusedSoftmaxCrossEntropy.from_module: loss must be an nn.CrossEntropyLoss, "
                            f"got {type(loss).__name__}")
        return cls(loss.weight, ignore_index=loss.ignore_index, reduction=loss.reduction,
                   label_smoothing=loss.label_smoothing)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dtype != torch.long or not input.is_floating_point():
            return super().forward(input, target)  # class probabilities: PyTorch's loss
        weight = self.weight
        if autocast_dtype(input) is not None:  # autocast computes the loss in float32
            input = input.float()
            weight = None if weight is None else weight.float()
        elif weight is not None:
            weight = weight.to(input.dtype)
        return softmax_cross_entropy_op(input, target, weight, self.ignore_index, float(self.label_smoothing),
                                        self.reduction)


class FusedLinearCrossEntropy(nn.Module):
    """`F.cross_entropy(F.linear(hidden, weight, bias), target)` without the logits.

    FusedLinearCrossEntropy(in_features, out_features, bias=False, ignore_index=-100,
    label_smoothing=0.0, reduction="mean"): `weight` [out_features, in_features] and
    `bias` as nn.Linear's. forward(hidden [..., in_features], target [...]) -> the loss."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", device=None, dtype=None):
        super().__init__()
        layer = "FusedLinearCrossEntropy"
        self.in_features = check_positive_int(in_features, "in_features", layer)
        self.out_features = check_positive_int(out_features, "out_features", layer)
        self.ignore_index = _check_ignore_index(ignore_index, layer)
        self.label_smoothing = check_probability(label_smoothing, "label_smoothing", layer)
        if reduction not in LINEAR_REDUCTIONS:
            raise ValueError(f"{layer}: reduction must be one of {LINEAR_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        linear_parameters(self, in_features, out_features, bias, layer, device, dtype)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        reset_linear(self)

    @classmethod
    def from_module(cls, linear: nn.Linear, ignore_index: int = -100, label_smoothing: float = 0.0,
                    reduction: str = "mean") -> "FusedLinearCrossEntropy":
        """The loss over `linear`'s parameters (shared: its trained weights)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedLinearCrossEntropy.from_module: linear must be an nn.Linear, "
                            f"got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.in_features:
            raise ValueError(f"FusedLinearCrossEntropy: hidden must be [..., {self.in_features}], "
                             f"got shape {tuple(hidden.shape)}")
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"FusedLinearCrossEntropy: target must have shape {tuple(hidden.shape[:-1])}, "
                             f"got {tuple(target.shape)}")
        return linear_cross_entropy(hidden.reshape(-1, self.in_features), self.weight, self.bias,
                                    target.reshape(-1), self.ignore_index, self.label_smoothing, self.reduction)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}")
