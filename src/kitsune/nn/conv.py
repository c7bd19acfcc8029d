"""`FusedConvBN`: a convolution, its batch norm and an optional activation.

In training mode it is exactly conv → BN (batch statistics, running statistics
updated) → activation. In eval mode the batch norm is folded into the
convolution (w' = w·γ/√(var+ε), b' = (b − mean)·γ/√(var+ε) + β) and the bias and
activation run as one `kitsune::fused_chain` kernel after the convolution. The fold
is cached and recomputed when any of the tensors it reads changes (their version
counters: an optimizer step, a `load_state_dict`, running statistics updated by a
training step), and computed afresh, differentiably, when gradients are wanted.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kitsune.ops.chain import ProgramBuilder
from kitsune.ops.fused_ops import activation_name

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# the layers' activation names as chain steps (kitsune.ops.chain)
_ACTIVATION_STEPS = {"none": None, "relu": ("relu", ()), "gelu": ("gelu", ()),
                     "gelu_tanh": ("gelu", (("approximate", "tanh"),)), "silu": ("silu", ()),
                     "sigmoid": ("sigmoid", ()), "tanh": ("tanh", ())}


class FusedConvBN(nn.Module):
    """conv → bn → activation, with children `conv` and `bn` (state-dict keys `conv.*`, `bn.*`).

    conv: nn.Conv1d/2d/3d; bn: the matching nn.BatchNorm with num_features == conv.out_channels
    and track_running_stats (eval folds the running statistics); activation: None, "relu",
    "gelu", "gelu_tanh", "silu", "sigmoid" or "tanh". The modules are used as given (shared)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, activation: str | None = None):
        super().__init__()
        _check_modules(conv, bn)
        self.conv, self.bn = conv, bn
        self.activation = activation_name(activation, "FusedConvBN: activation")
        self._fold_key = None
        self._folded = None

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module, activation: str | None = None) -> "FusedConvBN":
        """A FusedConvBN over copies of `conv` and `bn` (their trained weights and statistics)."""
        _check_modules(conv, bn)
        return cls(copy.deepcopy(conv), copy.deepcopy(bn), activation)

    @classmethod
    def from_module(cls, sequential: nn.Sequential, activation: str | None = None) -> "FusedConvBN":
        """From nn.Sequential(conv, bn) (copies)."""
        if not isinstance(sequential, nn.Sequential) or len(sequential) != 2:
            raise TypeError("FusedConvBN.from_module: sequential must be nn.Sequential(conv, bn), "
                            f"got {type(sequential).__name__}")
        return cls.from_modules(sequential[0], sequential[1], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._activate(self.bn(self.conv(x)), None)
        weight, bias = self.folded()
        return self._activate(self.conv._conv_forward(x, weight, None), bias)

    def _activate(self, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y + bias (per channel) then the activation, as one chain kernel."""
        step = _ACTIVATION_STEPS[self.activation]
        if bias is None and step is None:
            return y
        builder = ProgramBuilder(y)
        if bias is not None:
            shape = (-1,) + (1,) * (y.dim() - 2)
            builder.step("add", [builder.tensor(bias.to(y.dtype).reshape(shape))])
        if step is not None:
            builder.step(step[0], (), step[1])
        return builder.run()

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's weight and bias with the batch norm folded in (eval)."""
        sources = self._fold_sources()
        if torch.compiler.is_compiling() or \
                (torch.is_grad_enabled() and any(t.requires_grad for t in sources if t is not None)):
            return self._fold()  # traced, or differentiable: not cached
        key = tuple((id(t), t._version) if t is not None else None for t in sources) + (self.bn.eps,)
        if key != self._fold_key or self._folded is None:
            with torch.no_grad():
                self._folded = self._fold()
            self._fold_key = key
        return self._folded

    def _fold_sources(self) -> tuple:
        bn = self.bn
        return (self.conv.weight, self.conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        conv, bn = self.conv, self.bn
        scale = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        weight = conv.weight * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1)).to(conv.weight.dtype)
        return weight, shift.to(conv.weight.dtype)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def _check_modules(conv, bn) -> None:
    if not isinstance(conv, CONVOLUTIONS):
        raise TypeError(f"FusedConvBN: conv must be an nn.Conv1d/2d/3d, got {type(conv).__name__}")
    if not isinstance(bn, NORMS):
        raise TypeError(f"FusedConvBN: bn must be an nn.BatchNorm1d/2d/3d, got {type(bn).__name__}")
    if CONVOLUTIONS.index(type(conv)) != NORMS.index(type(bn)):
        raise ValueError(f"FusedConvBN: bn ({type(bn).__name__}) does not match conv ({type(conv).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"FusedConvBN: bn.num_features ({bn.num_features}) must equal conv.out_channels "
                         f"({conv.out_channels})")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("FusedConvBN: bn must track running statistics (track_running_stats=True): "
                         "eval() folds them into the convolution")
