"""One op's arguments as the lazy region records them.

`Refs` turns the arguments into a graph template (references to pending nodes,
real inputs and lifted floats; constants) and a signature (argument layouts and
type-tagged constants) that keys the metadata cache, and refuses what cannot be
recorded (`Eager`, with the reason). `fake_meta` computes eager's result
metadata for a signature with fake tensors.
"""
from __future__ import annotations

import math

import torch

from kitsune import _compat
from kitsune._compat import FakeTensorMode

from kitsune.ir.scalar import SUPPORTED_DTYPES
from kitsune.lazy import ops as lazy_ops
from kitsune.lazy.graph import NODE
from kitsune.lazy.tensor import LazyTensor, fake_from_meta, meta_of

aten = torch.ops.aten
_LIFTABLE = (torch.float32, torch.float64)
_DTYPES = frozenset(SUPPORTED_DTYPES)
_FAKE_MODE: FakeTensorMode | None = None
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Eager(Exception):
    """This op runs eagerly; args[0] is the reason."""


def fake_mode() -> FakeTensorMode:
    global _FAKE_MODE
    if _FAKE_MODE is None:
        _FAKE_MODE = FakeTensorMode()
    return _FAKE_MODE


def storage_of(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def fake_meta(func, args, kwargs):
    """Eager's result metadata for these arguments, or the reason the op runs eagerly."""
    mode = fake_mode()
    to_fake = lambda t: fake_from_meta(t._meta if isinstance(t, LazyTensor) and t.pending else meta_of(t), mode)
    try:
        fargs, fkwargs = _compat.tree_map_only(torch.Tensor, to_fake, (args, kwargs))
        with mode:
            out = func(*fargs, **fkwargs)
    except Exception as error:  # noqa: BLE001 - the eager run raises the user's error, at the op
        return f"no fake result ({type(error).__name__})"
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return [meta_of(o) for o in out]  # several results (native_layer_norm, var_mean): a list
    if not isinstance(out, torch.Tensor):
        return "result is not a tensor"
    return meta_of(out)


_CONSTANTS = (int, bool, type(None))


def plain_arguments(region, args):
    """`Refs(...).arguments(args, {})` for the common case, with no Refs made: no pending
    writes in the region, and every argument a pending placeholder of this region, a real
    tensor the graph already reads (on the graph's device), or an int, bool or None, with
    at least one placeholder. (args template, signature), or None where anything else is
    met (nothing was changed: Refs then handles it)."""
    if region.writes:
        return None
    graph = region.graph
    device, largest, lazy = graph.device, 0, False
    temps, sigs = [], []
    for a in args:
        kind = type(a)
        if kind is LazyTensor:
            if a._real is not None or a._region is not region or a._meta[4] != device:
                return None
            lazy = True
            temps.append((NODE, a._node))
            sigs.append(a._meta)
        elif kind in _PLAIN:
            slot = graph.input_slots.get(id(a))
            if slot is None or a.requires_grad and torch.is_grad_enabled() or graph.input_keys[slot][4] != device:
                return None
            if graph.input_sizes[slot] > largest:
                largest = graph.input_sizes[slot]
            temps.append(graph.input_refs[slot])
            sigs.append(graph.input_keys[slot])
        elif kind in _CONSTANTS:
            temps.append(a)
            sigs.append((kind, a))
        else:
            return None
    if not lazy:
        return None
    if largest > graph.largest:
        graph.largest = largest
    return tuple(temps), (tuple(sigs), ())


class Refs:
    """Turns one op's arguments into a graph template and a metadata signature,
    checking that the op can be recorded (one device, supported dtypes, no autograd).

    This runs for every recorded op: `arguments` handles tensors inline (a pending
    placeholder of this region, a real tensor already read by the graph: its layout
    and storage are the ones noted when its slot was made), the rest goes through
    `template`. A pending placeholder's dtype was checked when its node was recorded
    (`check_result`), so only its device is compared here."""

    __slots__ = ("region", "graph", "lazy", "floats", "largest", "device", "func", "args", "_lift")

    def __init__(self, region, func, args):
        self.region = region
        self.graph = region.graph
        self.lazy = False
        self.floats: list | None = None  # the graph's float constants, exactly
        self.largest = 0                 # the most elements of a real tensor argument
        self.device = None
        self.func, self.args, self._lift = func, args, None

    def arguments(self, args, kwargs) -> tuple:
        """(args template, kwargs template, signature) of the op's arguments, checked (`check`)."""
        region = self.region
        temps, sigs = [], []
        i = -1
        for a in args:  # (no enumerate: one allocation less per op)
            i += 1
            if type(a) is LazyTensor and a._real is None and a._region is region:
                meta = a._meta
                if self.device is None:
                    self.device = meta[4]
                elif meta[4] != self.device:
                    raise Eager("tensors on several devices")
                self.lazy = True
                temps.append((NODE, a._node))
                sigs.append(meta)
            elif type(a) in _PLAIN:
                t, meta = self._real(a)
                temps.append(t)
                sigs.append(meta)
            else:
                t, sig = self.template(a, i)
                temps.append(t)
                sigs.append(sig)
        kwargs_t = kwargs_s = ()
        if kwargs:
            pairs = [(k, self.template(v, -1)) for k, v in kwargs.items()]
            kwargs_t = tuple((k, t) for k, (t, _) in pairs)
            kwargs_s = tuple((k, sig) for k, (_, sig) in pairs)
        graph = self.graph
        if self.lazy and not kwargs and self.device == graph.device:  # `check`, inline: what is left of it
            if self.largest > graph.largest:
                graph.largest = self.largest
        else:
            self.check(self.func, kwargs)
        return tuple(temps), kwargs_t, (tuple(sigs), kwargs_s)

    @property
    def lift(self) -> frozenset:
        """Positions where a Python float becomes a graph input: Tensor positions of an
        op whose tensors are all float32/float64 (so the result dtype stays eager's)."""
        if self._lift is None:
            tensors = [a for a in self.args if isinstance(a, torch.Tensor)]
            self._lift = lazy_ops.scalar_positions(self.func) if tensors and all(
                t.dtype in _LIFTABLE for t in tensors) else frozenset()
        return self._lift

    def template(self, value, position: int):
        """(graph template, signature item) of one argument: tensors become references and
        their metadata; constants stay, tagged with their type (1, 1.0, True and -0.0 differ)."""
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if type(value) in (list, tuple):
            pairs = [self.template(v, -1) for v in value]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        if type(value) is float:
            if position not in self.lift:  # a constant of the graph; -0.0 and 0.0 differ
                self.floats = (self.floats or []) + [value.hex()]
                return value, float
            return self.graph.scalar_ref(value), float
        return value, (type(value), value)

    def _tensor(self, t: torch.Tensor):
        if isinstance(t, LazyTensor):
            if t._real is None and t._region is self.region:
                self.lazy = True
                self._see(t._meta)
                return (NODE, t._node), t._meta
            t = t.value()
        return self._real(t)

    def _real(self, t: torch.Tensor):
        """A real tensor: a reference to its pending write, or to its input slot."""
        if t.requires_grad and torch.is_grad_enabled():
            raise Eager("requires_grad")
        writes, graph = self.region.writes, self.graph
        if writes:
            pending = writes.get(id(t))
            if pending is not None:
                self.lazy = True
                meta = graph.metas[pending[1]]
                self._see(meta)
                return (NODE, pending[1]), meta
        slot = graph.input_slots.get(id(t))
        if slot is None:
            meta, storage = meta_of(t), storage_of(t)
            if writes and storage in self.region.write_storages:
                raise Eager("read of an alias of a pending write")
            self._see(meta)
            return graph.new_input(t, meta, storage, math.prod(meta[0])), meta
        if writes and graph.input_owners[slot] in self.region.write_storages:
            raise Eager("read of an alias of a pending write")
        meta = graph.input_keys[slot]
        if self.device is None:
            self.device = meta[4]
        elif meta[4] != self.device:
            raise Eager("tensors on several devices")
        if graph.input_sizes[slot] > self.largest:
            self.largest = graph.input_sizes[slot]
        return graph.input_refs[slot], meta

    def _see(self, meta) -> None:
        shape, _, _, dtype, device = meta
        if dtype not in _DTYPES:
            raise Eager(f"{dtype} tensors")
        if self.device is None:
            self.device = device
        elif device != self.device:
            raise Eager("tensors on several devices")
        n = math.prod(shape)
        if n > self.largest:
            self.largest = n

    def check(self, func, kwargs) -> None:
        """After the template: refuse what would make the graph wrong or not worth it."""
        graph = self.graph
        if self.device is None:
            raise Eager("no tensor arguments")
        if func is aten._to_copy.default and kwargs.get("device") not in (None, self.device):
            raise Eager("device transfer")
        if not self.lazy and self.largest < self.region.min_tensor_size:
            raise Eager("small tensors")
        if graph.device is None:
            graph.device = self.device
        elif graph.device != self.device:
            raise Eager("tensors on another device than the pending graph")
        if self.largest > graph.largest:
            graph.largest = self.largest


def check_result(meta):
    """`meta` itself, or the reason a result with it is not recorded (a str): a dtype the
    code generators do not support (a pending placeholder's dtype is not checked again)."""
    if type(meta) is tuple and meta[3] not in _DTYPES:
        return f"{meta[3]} results"
    return meta
