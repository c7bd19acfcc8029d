"""A compiled graph's hot path as one generated Python function.

An `fx.GraphModule` call goes through `nn.Module.__call__`, then calls a
`FusedGroupCall` object per fusion group that compares strides, allocates
and calls its kernel's launcher object, and an `operator.getitem` per output:
at tiny sizes that is most of a call's time. `flat_function(gm)` writes what
Inductor's wrapper writes instead: one function over the graph's values, with
each group's outputs allocated at the layout known at compile time and its
kernel called directly (`CpuKernel.direct_launch()`: the launcher extension
and the kernel's entry, constants in the source), and every other node a
plain call of its target.

What each group still checks, and why no more:
- inputs of a directly called group whose layout is not known at compile time
  (graph inputs: Dynamo guards them under `torch.compile`, but a graph called
  directly, or a backward's gradient, may differ; outputs of ops left to
  PyTorch; outputs of groups that are not called directly) have their
  strides compared with the compiled ones, one tuple comparison each; inputs
  with no dimension above one (any strides address the same elements) and
  outputs of directly called groups (allocated here) are not compared;
- the kernel's status: not 0 (an integer division by zero, an index out of
  range) runs the group through its `FusedGroupCall` as before.
Either way the rare path is the group's `FusedGroupCall.call_in_layout`: the
same checks, fallbacks, logging and counting as ever, with outputs copied to
the compiled layout so that the kernels after it may read them unchecked.

Groups that are not called directly (symbolic sizes, Triton kernels, a kernel
switched off, a stand-in kernel in a test) are called through their
`FusedGroupCall`. With KITSUNE_DEBUG the generated function runs the graph's
fx code instead (every group checked against eager). A node or argument the
generator does not know raises `Unsupported`: the graph then runs its fx code.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from kitsune import _compat
from kitsune.runtime import fused_call
from kitsune.runtime.fused_call import FusedGroupCall


class Unsupported(Exception):
    """The graph has something the generator does not write; its fx code runs."""


def flat_function(gm: fx.GraphModule):
    """The generated function `f(gm, *inputs)` computing what `gm(*inputs)` does."""
    writer = _Writer()
    source = writer.write(gm.graph)
    code = compile(source, f"<kitsune wrapper {id(gm):x}>", "exec")
    namespace = dict(writer.globals)
    exec(code, namespace)  # noqa: S102 - our own generated source
    fn = namespace["kitsune_graph"]
    fn.kitsune_source = source
    for call in writer.calls:  # a kernel attached or switched off: written again
        call.watch(gm)
    return fn


class _Writer:
    def __init__(self):
        self.globals = {"_fused_call": fused_call, "_get_num_threads": torch.get_num_threads}
        self.lines: list[str] = []
        self.names: dict[fx.Node, str] = {}
        self.trusted: set[fx.Node] = set()  # values in the compiled layout, allocated here
        self.group_outputs: dict[fx.Node, list[str]] = {}
        self.direct_calls: list[FusedGroupCall] = []
        self.calls: list[FusedGroupCall] = []
        self.freed: set[str] = set()
        self.bound: dict[tuple, str] = {}  # (prefix, id(value)) -> its global name

    def write(self, graph: fx.Graph) -> str:
        nodes = list(graph.nodes)
        last_use = _last_uses(nodes)
        params = []
        for node in nodes:
            if node.op == "placeholder":
                self.names[node] = f"a{len(params)}"
                params.append(self.names[node])
            elif node.op == "output":
                self.lines.append(f"return {self.expr(node.args[0])}")
                break
            else:
                self.node(node)
            self.free([self.names[n] for n in last_use.get(node, ()) if n in self.names])
        header = [f"def kitsune_graph(self, {', '.join(params)}):" if params else "def kitsune_graph(self):",
                  "    if _fused_call._DEBUG:  # every group checked against eager: the fx code",
                  f"        return self.fx_forward({', '.join(params)})"]
        if self.direct_calls:
            header.append("    _nt = _get_num_threads()")
        return "\n".join(header + ["    " + line for line in self.lines]) + "\n"

    def free(self, names: list) -> None:
        """Drop values after their last use (as fx's code does): memory is freed as early."""
        names = [n for n in dict.fromkeys(names) if n not in self.freed]
        if names:
            self.freed.update(names)
            self.lines.append("del " + ", ".join(names))

    def node(self, node: fx.Node) -> None:
        if node.op == "call_function" and isinstance(node.target, FusedGroupCall):
            self.group(node)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.group_outputs:
            self.names[node] = self.group_outputs[node.args[0]][node.args[1]]
            if node.args[0] in self.trusted:
                self.trusted.add(node)
        elif node.op == "call_function":
            target = self.constant(node.target, "f")
            args = [self.expr(a) for a in node.args] + [f"{k}={self.expr(v)}" for k, v in node.kwargs.items()]
            self.names[node] = f"v{len(self.names)}"
            self.lines.append(f"{self.names[node]} = {target}({', '.join(args)})")
        elif node.op == "get_attr":
            getter = self.constant(operator.attrgetter(node.target), "attr")
            self.names[node] = f"v{len(self.names)}"
            self.lines.append(f"{self.names[node]} = {getter}(self)")
        else:
            raise Unsupported(f"{node.op} node {node.name}")

    def group(self, node: fx.Node) -> None:
        call: FusedGroupCall = node.target
        outputs = [f"g{len(self.group_outputs)}_{k}" for k in range(call.n_outputs)]
        self.group_outputs[node] = outputs
        args = ", ".join(self.expr(a) for a in node.args)
        direct = _direct_launch(call, node)
        g = self.constant(call, "g")
        self.calls.append(call)
        targets = ", ".join(outputs) + ("," if len(outputs) == 1 else "")
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        if direct is None:
            self.lines.append(f"{targets} = {g}({args})  # {call.spec.name}")
        else:
            self.direct_group(node, call, direct, outputs, f"{targets} = {g}.call_in_layout({args})")
        self.free([name for k, name in enumerate(outputs) if k not in used])

    def direct_group(self, node: fx.Node, call: FusedGroupCall, direct, outputs: list, slow: str) -> None:
        """A group whose kernel generated code calls directly: its layout checks, its
        outputs' allocation, the launch, and `slow` where either says no."""
        self.direct_calls.append(call)
        self.trusted.add(node)
        checks = [self.stride_check(self.expr(a), shape, stride)
                  for a, shape, stride in zip(node.args, call.input_shapes, call.input_strides)
                  if a not in self.trusted and _addresses_by_stride(shape)]
        body = [f"{name} = {self.allocator(call)}({_ints(shape)}, {_ints(stride)}, {self.constant(dtype, 'dt')})"
                for name, (shape, stride, dtype) in zip(outputs, call.output_meta)]
        if direct.numel > 0:
            tensors = [self.expr(a) for a in node.args] + outputs
            if not direct.takes_tensors:
                tensors = [f"{t}.data_ptr()" for t in tensors]
            launch = self.constant(direct.call, "launch")
            prefix = [self.constant(p, "k") if not isinstance(p, int) else repr(p) for p in direct.prefix]
            body += [f"if {launch}({', '.join(prefix + tensors + [str(direct.numel), '_nt'])}):", f"    {slow}"]
        self.lines.append(f"# {call.spec.name}")
        if checks:
            self.lines += [f"if {' or '.join(checks)}:", f"    {slow}", "else:"] + [f"    {line}" for line in body]
        else:
            self.lines += body

    def stride_check(self, value: str, shape, stride) -> str:
        """Source that is true when `value`'s strides differ from the compiled ones
        in a dimension above one (those of size-1 dimensions address nothing)."""
        dims = [d for d, n in enumerate(shape) if int(n) > 1]
        if len(dims) == len(shape):
            return f"{value}.stride() != {_ints(stride)}"
        pick = self.constant(operator.itemgetter(*dims), "pick") if len(dims) > 1 else None
        if pick is None:
            return f"{value}.stride()[{dims[0]}] != {int(stride[dims[0]])}"
        return f"{pick}({value}.stride()) != {_ints(stride[d] for d in dims)}"

    def allocator(self, call: FusedGroupCall) -> str:
        alloc = _compat.fast_empty_strided(call.device)
        if alloc is None:
            device = call.device
            alloc = lambda shape, stride, dtype: torch.empty_strided(shape, stride, dtype=dtype, device=device)  # noqa: E731
        return self.constant(alloc, "alloc")

    def constant(self, value, prefix: str) -> str:
        """A global name bound to `value` in the generated code (one per object)."""
        key = (prefix, id(value))
        if key not in self.bound:
            self.bound[key] = f"_{prefix}{len(self.globals)}"
            self.globals[self.bound[key]] = value
        return self.bound[key]

    def expr(self, arg) -> str:
        """Python source for an argument: a value's name, a literal, or a bound constant."""
        if isinstance(arg, fx.Node):
            return self.names[arg]
        if type(arg) in (int, bool, str) or arg is None:
            return repr(arg)
        if type(arg) is float:
            return repr(arg) if math.isfinite(arg) else self.constant(arg, "c")
        if isinstance(arg, (list, tuple)) and type(arg) is not torch.Size:
            items = [self.expr(a) for a in arg]
            if isinstance(arg, tuple):
                return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
            return f"[{', '.join(items)}]"
        if any(isinstance(a, fx.Node) for a in _leaves(arg)):
            raise Unsupported(f"argument {arg!r}")
        return self.constant(arg, "c")


def _leaves(arg):
    if isinstance(arg, dict):
        for v in arg.values():
            yield from _leaves(v)
    elif isinstance(arg, slice):
        yield from (arg.start, arg.stop, arg.step)
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from _leaves(a)
    else:
        yield arg


def _last_uses(nodes: list) -> dict:
    """node -> the values whose last use it is (as fx's own code frees them)."""
    last = {}
    for node in nodes:
        for a in node.all_input_nodes:
            last[a] = node
    uses: dict = {}
    for value, user in last.items():
        uses.setdefault(user, []).append(value)
    return uses


def _direct_launch(call: FusedGroupCall, node: fx.Node):
    """The kernel's direct launch when generated code may call it directly, else None."""
    kernel = call.kernel
    direct = getattr(kernel, "direct_launch", None)
    if direct is None or call.sizes is not None or call.device.type != "cpu":
        return None
    if len(node.args) != call.n_tensors or len(call.input_strides) != call.n_tensors:
        return None
    return direct()


def _addresses_by_stride(shape) -> bool:
    """Whether strides decide which elements a tensor of this shape addresses: some
    dimension above one and none empty (then any strides address the same)."""
    return any(int(n) > 1 for n in shape) and all(int(n) > 0 for n in shape)


def _ints(values) -> str:
    items = [str(int(v)) for v in values]
    return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
