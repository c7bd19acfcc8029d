"""`FusedElementwise`: a chain of pointwise operations built by method calls,

    f = kitsune.nn.FusedElementwise().add(1.0).mul(2.0).sub(0.5).relu()
    y = f(x)                      # relu((x + 1) * 2 - 0.5): one generated kernel

Each method is named and parameterised as its torch function (`.add(other, alpha=1)`,
`.gelu(approximate="none")`, `.clamp(min=None, max=None)`, `.where(condition, other)`,
`.dropout(p=0.5)`, ...); `other` is a number or a tensor (kept as a buffer, so it
follows `.to()`). The chain runs as one `kitsune::fused_chain` op (kitsune.ops.chain).
`.dropout(p)` drops only in training mode (`train()`, the default), with a mask drawn
at each call and multiplied in the same kernel; in `eval()` it does nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from kitsune.ops.chain import ProgramBuilder

_REQUIRED = object()
# method -> its parameters after the input: (name, default); _REQUIRED ones are positional
METHODS = {
    "add": (("other", _REQUIRED), ("alpha", 1)),
    "sub": (("other", _REQUIRED), ("alpha", 1)),
    "mul": (("other", _REQUIRED),),
    "div": (("other", _REQUIRED), ("rounding_mode", None)),
    "pow": (("exponent", _REQUIRED),),
    "maximum": (("other", _REQUIRED),),
    "minimum": (("other", _REQUIRED),),
    "where": (("condition", _REQUIRED), ("other", _REQUIRED)),
    "clamp": (("min", None), ("max", None)),
    "gelu": (("approximate", "none"),),
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    **{name: () for name in ("relu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish", "relu6",
                             "exp", "log", "neg", "abs", "sqrt", "rsqrt", "sin", "cos", "erf", "square",
                             "reciprocal")},
}
_STRINGS = {"approximate": ("none", "tanh"), "rounding_mode": (None, "trunc", "floor")}


class FusedElementwise(nn.Module):
    """A pointwise chain applied to one tensor; build it with the methods (each returns self)."""

    def __init__(self):
        super().__init__()
        self.steps: list = []  # (name, positional values, keyword values); tensors as ("buffer", name)

    def _append(self, name: str, values: dict) -> "FusedElementwise":
        args, kwargs = [], []
        for param, default in METHODS[name]:
            value = self._keep(name, param, values[param])
            if default is _REQUIRED:
                args.append(value)
            elif value is not default and value != default:
                kwargs.append((param, value))
        self.steps.append((name, tuple(args), tuple(kwargs)))
        return self

    def _keep(self, method: str, param: str, value):
        """A tensor becomes a buffer; a number or string is checked."""
        if isinstance(value, torch.Tensor):
            buffer = f"arg{len(self._buffers)}"
            self.register_buffer(buffer, value)
            return ("buffer", buffer)
        if param in _STRINGS:
            if value not in _STRINGS[param]:
                raise ValueError(f"FusedElementwise.{method}: {param} must be one of {_STRINGS[param]}, "
                                 f"got {value!r}")
            return value
        if value is None and param in ("min", "max"):
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"FusedElementwise.{method}: {param} must be a number or a tensor, "
                            f"got {type(value).__name__}")
        return value

    def dropout(self, p: float = 0.5) -> "FusedElementwise":
        """F.dropout(x, p) in training mode; nothing in eval()."""
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ValueError(f"FusedElementwise.dropout: p must be a probability between 0 and 1, got {p!r}")
        self.steps.append(("dropout", (float(p),), ()))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.steps:
            raise RuntimeError("FusedElementwise: the chain is empty; add operations first (.add(1.0).relu())")
        builder = ProgramBuilder(x)
        for name, args, kwargs in self.steps:
            if name == "dropout":
                builder.dropout(args[0], self.training)
                continue
            builder.step(name, [self._token(builder, a) for a in args],
                         [(k, self._token(builder, v)) for k, v in kwargs])
        return builder.run()

    def _token(self, builder: ProgramBuilder, value) -> str:
        if type(value) is tuple and value[0] == "buffer":
            return builder.tensor(getattr(self, value[1]))
        if value is None:
            return "none"
        if isinstance(value, str):
            return value
        return builder.scalar(value)

    def extra_repr(self) -> str:
        return " → ".join(name for name, _, _ in self.steps)


def _method(name: str):
    params = METHODS[name]

    def method(self, *args, **kwargs):
        values = {}
        names = [p for p, _ in params]
        if len(args) > len(names):
            raise TypeError(f"FusedElementwise.{name}() takes {len(names)} arguments, got {len(args)}")
        for param, value in zip(names, args):
            values[param] = value
        for param, value in kwargs.items():
            if param not in names:
                raise TypeError(f"FusedElementwise.{name}() got an unexpected keyword argument {param!r}")
            if param in values:
                raise TypeError(f"FusedElementwise.{name}() got multiple values for argument {param!r}")
            values[param] = value
        for param, default in params:
            if param not in values:
                if default is _REQUIRED:
                    raise TypeError(f"FusedElementwise.{name}() missing required argument {param!r}")
                values[param] = default
        return self._append(name, values)

    signature = ", ".join(p if d is _REQUIRED else f"{p}={d!r}" for p, d in params)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Appends torch's {name}(x{', ' if signature else ''}{signature}) to the chain."
    return method


for _name in METHODS:
    setattr(FusedElementwise, _name, _method(_name))
