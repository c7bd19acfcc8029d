"""Small helpers the `kitsune.nn` layers share: argument checks and autocast casts."""
from __future__ import annotations

import math

import torch
from torch import nn


def check_positive_int(value, name: str, layer: str, allow_zero: bool = False) -> int:
    """`value` as an int, or a TypeError/ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{layer}: {name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")
    return value


def check_probability(value, name: str, layer: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{layer}: {name} must be between 0.0 and 1.0, got {value}")
    return float(value)


def autocast_dtype(x: torch.Tensor):
    """The dtype autocast asks for on x's device, or None where autocast is off."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def cast(tensors, dtype):
    """The floating tensors cast to dtype (None kept); all as they are where dtype is None."""
    if dtype is None:
        return tuple(tensors)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def linear_parameters(module: nn.Module, in_features: int, out_features: int, bias: bool, layer: str,
                      device=None, dtype=None) -> None:
    """nn.Linear's `weight` [out, in] and `bias` [out] (or None) on `module`, with nn.Linear's
    initialisation (`reset_linear`); `bias` must be a bool."""
    if not isinstance(bias, bool):
        raise TypeError(f"{layer}: bias must be a bool, got {type(bias).__name__}")
    factory = {"device": device, "dtype": dtype}
    module.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
    if bias:
        module.bias = nn.Parameter(torch.empty(out_features, **factory))
    else:
        module.register_parameter("bias", None)
    reset_linear(module)


def reset_linear(module: nn.Module) -> None:
    """nn.Linear.reset_parameters on a module with `weight` and `bias`."""
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = module.weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(module.bias, -bound, bound)
