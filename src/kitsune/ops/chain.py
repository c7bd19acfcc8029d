"""Chains of operations as one custom op (`kitsune::fused_chain`), and `fused(inputs, operations)`.

A chain applies operations from the op list (`kitsune.fusion.engine.OPERATIONS`: the
same functions `FusionEngine.fuse([...])` runs) to a running value that starts as
`inputs[0]`. Its *program* is a string, so that it fits a custom op's schema and is
part of a compiled kernel's key: steps separated by ";", each `name` or
`name:arg,arg,...`, where an argument is `i<k>` (inputs[k]), a number (Python's
`repr` of a float, which reads back exactly), `key=<arg>` (a keyword argument), `none`,
or a bare word (a string such as `tanh`). Numbers are part of the program: a kernel
is compiled per value (a chain's constants are fixed when it is built).

    fused_chain_op([x, y], "add:i1;mul:2.0;gelu:approximate=tanh")
    == F.gelu((x + y) * 2.0, approximate="tanh")

`fused(inputs, ["matmul", "add", "relu"])`: the first operation takes inputs[0], and
every binary operation takes the next input in order (`relu(x @ w + b)`); a step may
also be ("name", *numbers) to give its arguments as numbers (("add", 1.0)).
"""
from __future__ import annotations

import functools
import re

import torch

# operations whose second argument is a tensor in `fused()` (the next input); where takes two
BINARY = {"add": 1, "sub": 1, "mul": 1, "div": 1, "pow": 1, "maximum": 1, "minimum": 1, "matmul": 1,
          "mm": 1, "bmm": 1, "linear": 1, "scale": 1, "bias": 1, "where": 2}
# the pointwise operations of the op list (what the builder chains)
POINTWISE = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "scale", "bias", "relu", "gelu",
             "silu", "sigmoid", "tanh", "leaky_relu", "elu", "hardswish", "hardsigmoid", "softplus", "mish",
             "hardtanh", "relu6", "exp", "log", "neg", "abs", "sqrt", "rsqrt", "sin", "cos", "erf", "square",
             "reciprocal", "clamp", "where")
# the chain may also multiply matrices (fused(): `matmul` then its epilogue)
CHAIN_OPERATIONS = frozenset(POINTWISE) | {"matmul", "mm", "bmm", "linear"}
_REF = re.compile(r"^i(\d+)$")
_WORD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


def operations() -> dict:
    """The op list's functions (imported on first use: kitsune.fusion imports the compiler)."""
    from kitsune.fusion.engine import OPERATIONS
    return OPERATIONS


@functools.lru_cache(maxsize=1024)  # a layer parses its program on every call
def parse_program(program: str, input_count: int) -> tuple:
    """The steps of `program`: ((name, args, kwargs), ...) with input references as
    ("i", k); ValueError naming what is wrong."""
    if not isinstance(program, str) or not program.strip():
        raise ValueError(f"fused_chain: program must be a non-empty string of steps, got {program!r}")
    if input_count < 1:
        raise ValueError("fused_chain: inputs must hold at least one tensor")
    steps = []
    for text in program.split(";"):
        name, _, rest = text.strip().partition(":")
        if name not in CHAIN_OPERATIONS:
            raise ValueError(f"fused_chain: unknown operation {name!r} in program {program!r}; "
                             f"known: {sorted(CHAIN_OPERATIONS)}")
        args, kwargs = [], []
        for token in filter(None, (t.strip() for t in rest.split(","))):
            key, eq, value = token.partition("=")
            parsed = _argument(value if eq else key, input_count, program)
            if eq:
                kwargs.append((key.strip(), parsed))
            else:
                args.append(parsed)
        steps.append((name, tuple(args), tuple(kwargs)))
    return tuple(steps)


def _argument(token: str, input_count: int, program: str):
    token = token.strip()
    match = _REF.match(token)
    if match:
        index = int(match.group(1))
        if not 0 < index < input_count:
            raise ValueError(f"fused_chain: {token!r} in program {program!r} is out of range "
                             f"({input_count} inputs; i0 is the running value)")
        return ("i", index)
    if token == "none":
        return None
    try:
        return float(token)
    except ValueError:
        pass
    if not _WORD.match(token):
        raise ValueError(f"fused_chain: cannot read argument {token!r} in program {program!r}")
    return token


def run_program(steps: tuple, inputs: list) -> torch.Tensor:
    """The chain applied to inputs[0] with PyTorch ops (its reference semantics)."""
    table = operations()

    def value(arg):
        return inputs[arg[1]] if type(arg) is tuple else arg

    x = inputs[0]
    for name, args, kwargs in steps:
        x = table[name](x, *(value(a) for a in args), **{k: value(v) for k, v in kwargs})
    return x


def format_step(name: str, args=(), kwargs=()) -> str:
    """One program step: args/kwarg values are already tokens ("i1", "2.0", "tanh", "none")."""
    tokens = list(args) + [f"{k}={v}" for k, v in kwargs]
    return f"{name}:{','.join(tokens)}" if tokens else name


def fused(inputs, operations_list, *, training: bool = True) -> torch.Tensor:
    """The operations applied in order as one `kitsune::fused_chain` op: the first takes
    inputs[0], each binary operation the next input (`fused([x, w, b], ["matmul", "add",
    "relu"])` is `relu(x @ w + b)`). A step is "name" or ("name", *numbers). "dropout"
    (("dropout", p), p=0.5 by default) drops with a mask drawn here when `training`."""
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("fused: inputs must be a non-empty list of tensors")
    if isinstance(operations_list, str) or not operations_list:
        raise TypeError(f"fused: operations must be a non-empty list of names, got {operations_list!r}")
    builder = ProgramBuilder(inputs[0])
    taken = 1
    for i, step in enumerate(operations_list):
        name, numbers = _split_step(step, i)
        if name == "dropout":
            builder.dropout(numbers[0] if numbers else 0.5, training)
            continue
        if name not in CHAIN_OPERATIONS:
            raise ValueError(f"fused: operations[{i}]: unknown operation {name!r}; known: "
                             f"{sorted(CHAIN_OPERATIONS | {'dropout'})}")
        args = [builder.scalar(n) for n in numbers]
        if not numbers:
            wanted = BINARY.get(name, 0)
            if taken + wanted > len(inputs):
                raise ValueError(f"fused: operations[{i}] ({name!r}) needs input {taken + wanted - 1}, "
                                 f"but only {len(inputs)} inputs were given")
            args = [builder.tensor(t) for t in inputs[taken:taken + wanted]]
            taken += wanted
        builder.step(name, args)
    if taken != len(inputs):
        raise ValueError(f"fused: {len(inputs)} inputs given but the operations use {taken}")
    return builder.run()


def _split_step(step, i):
    if isinstance(step, str):
        return step.strip().lower(), ()
    if isinstance(step, (tuple, list)) and step and isinstance(step[0], str) and \
            all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in step[1:]):
        return step[0].strip().lower(), tuple(step[1:])
    raise TypeError(f"fused: operations[{i}] must be 'name' or ('name', *numbers), got {step!r}")


class ProgramBuilder:
    """Collects a chain's inputs and steps, then runs it as one custom op."""

    def __init__(self, first: torch.Tensor):
        self.inputs = [first]
        self.steps: list = []

    def tensor(self, t: torch.Tensor) -> str:
        self.inputs.append(t)
        return f"i{len(self.inputs) - 1}"

    @staticmethod
    def scalar(value: float) -> str:
        return repr(float(value))

    def step(self, name: str, args=(), kwargs=()) -> None:
        self.steps.append(format_step(name, args, kwargs))

    def dropout(self, p: float, training: bool) -> None:
        """F.dropout as a multiplication by a mask drawn here (scaled by 1/(1-p)): the chain
        stays one deterministic kernel; in eval (or p == 0) nothing."""
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout: p must be a probability between 0 and 1, got {p!r}")
        if not training or p == 0.0:
            return
        first = self.inputs[0]
        keep = torch.empty(self.running_shape(), dtype=first.dtype, device=first.device).bernoulli_(1.0 - p)
        mask = keep.mul_(1.0 / (1.0 - p)) if p < 1.0 else keep
        self.step("mul", [self.tensor(mask)])

    def running_shape(self) -> torch.Size:
        """The shape of the chain's value so far (the program run on meta tensors)."""
        if not self.steps:
            return self.inputs[0].shape
        metas = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in self.inputs]
        # uncached: Dynamo warns about (and skips) lru_cache wrappers it traces through
        steps = parse_program.__wrapped__(";".join(self.steps), len(metas))
        return run_program(steps, metas).shape

    def run(self) -> torch.Tensor:
        from kitsune.ops.fused_ops import fused_chain_op
        if not self.steps:  # nothing to do (a dropout in eval): still a new tensor, as the op's would be
            return self.inputs[0].clone()
        return fused_chain_op(self.inputs, ";".join(self.steps))
