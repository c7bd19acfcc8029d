"""The lazy region: a TorchDispatchMode that records instead of running.

Each aten call inside `kitsune.lazy()` reaches `LazyRegion.__torch_dispatch__`.
A recordable op (`kitsune.lazy.ops`) on tensors of one device becomes a node of
the pending graph and returns a `LazyTensor` with eager's metadata (fake-tensor
propagation, cached per op and argument layouts, so an error such as a shape
mismatch is raised at the op that causes it). Anything else is a sync point:
the pending graph is flushed (`flush`) and the op runs eagerly on real tensors.

In-place ops are recorded as their functional form: on a LazyTensor the
placeholder moves to the new node; on a real tensor the write is deferred and
the flush gives it the result (`_write_back`; reads of that tensor inside the
region see the pending value; a read through another alias of its storage
flushes first).
"""
from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kitsune import _compat

from kitsune.lazy import macro
from kitsune.lazy import ops as lazy_ops
from kitsune.lazy.graph import GRAPH_CACHE, STEPS as _STEPS, PendingGraph, call_compiled, compile_pending, run_eagerly
from kitsune.lazy.graph import step as _step
from kitsune.lazy.signature import Eager as _Eager, Refs as _Refs, check_result as _check_result, fake_meta as _fake_meta
from kitsune.lazy.signature import plain_arguments as _plain_arguments, storage_of as _storage
from kitsune.lazy.tensor import LazyTensor, meta_of

log = logging.getLogger("kitsune")
aten = torch.ops.aten
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_action_by_id, _ACTIONS_BY_ID = lazy_ops.action_by_id, lazy_ops._BY_ID
_RECORD, _VIEW, _EAGER = lazy_ops.RECORD, lazy_ops.VIEW, lazy_ops.EAGER
_INPLACE, _DECOMPOSE = lazy_ops.INPLACE, lazy_ops.DECOMPOSE
# ops that read only the dtype and device of their first argument
_NEW_TENSOR_OPS = frozenset({aten.new_full.default, aten.new_zeros.default, aten.new_ones.default,
                             aten.new_empty.default})
_placeholder = _compat.raw_make_wrapper_subclass  # (what LazyTensor.__new__ calls, without two frames)
_STRIDED = torch.strided


def _positional_placeholders() -> bool:
    """Whether `_make_wrapper_subclass` takes (cls, size, strides, storage_offset, memory_format,
    dtype, layout, device) by position in this torch (checked once; else keywords are used)."""
    try:
        probe = _placeholder(LazyTensor, (2, 3), (1, 2), 1, None, torch.float64, _STRIDED, torch.device("cpu"))
        return (tuple(probe.shape), probe.stride(), probe.storage_offset(), probe.dtype, probe.device.type) == \
            ((2, 3), (1, 2), 1, torch.float64, "cpu")
    except (TypeError, RuntimeError):
        return False


_POSITIONAL = _positional_placeholders()


@dataclass
class LazyStats:
    """What lazy regions did in this process (`kitsune.lazy_stats()`)."""
    ops_recorded: int = 0
    ops_eager: int = 0          # ops that ran eagerly inside a region (sync points and pass-through)
    ops_small: int = 0          # ops on tensors below min_tensor_size, run eagerly
    graphs_flushed: int = 0     # flushes that computed something
    graphs_compiled: int = 0    # flushes that ran a Kitsune-compiled graph
    cache_hits: int = 0
    cache_misses: int = 0
    sync_reasons: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["sync_reasons"] = dict(self.sync_reasons)
        total = self.cache_hits + self.cache_misses
        d["cache_hit_rate"] = self.cache_hits / total if total else 0.0
        return d


STATS = LazyStats()
_META_CACHE: dict = {}   # (op, argument signature) -> result Meta, or a reason to run eagerly
_RECIPES: dict = {}      # (composite op, argument signature) -> macro.Recipe
_CACHE_LIMIT = 50000     # entries of each before it is cleared


class LazyRegion(TorchDispatchMode):
    """One `with kitsune.lazy():` (see the module docstring)."""

    def __init__(self, min_tensor_size: int, config, max_pending_ops: int):
        super().__init__()
        self.min_tensor_size = min_tensor_size
        self.config = config
        self.max_pending_ops = max_pending_ops
        self.trace = None              # kitsune.lazy.macro.Trace of the decomposition running
        self._reset()

    def _reset(self) -> None:
        self.graph = PendingGraph()
        self.wrappers: list = []       # every LazyTensor made since the last flush
        self.writes: dict = {}         # id(real tensor) -> (tensor, node) deferred in-place writes
        self.write_storages: set = set()
        self.forwarding: list = []     # materialised placeholders the swap refused (retried at exit)

    # -- dispatch -------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        trace = self.trace
        if trace is None:
            if args and type(args[0]) is LazyTensor:  # the common case, recorded: _dispatch inline
                found = _ACTIONS_BY_ID.get(id(func))
                if found is not None and found[0] is func and found[1] is _RECORD:
                    try:
                        return self._record(func, _RECORD, args, kwargs)
                    except _Eager as why:
                        return self._run_eager(func, args, kwargs, why.args[0])
            if self.graph.nodes or self.writes:
                return self._dispatch(func, args, kwargs)
            limit, seen = self.min_tensor_size, False  # (_all_small, inline: this is every op of the loop)
            for a in args:
                if isinstance(a, torch.Tensor):
                    if type(a) not in _PLAIN or a.numel() >= limit:
                        return self._dispatch(func, args, kwargs)
                    seen = True
            if not seen:
                return self._dispatch(func, args, kwargs)
            STATS.ops_small += 1  # nothing pending, nothing worth recording: the pass-through's cost
            return func(*args, **kwargs)
        if not trace.busy:  # a call the decomposition being traced makes
            trace.busy = True
            try:
                out = self._dispatch(func, args, kwargs)
            finally:
                trace.busy = False
            trace.note(func, args, kwargs, out)
            return out
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func, args, kwargs):
        # (a pending placeholder first, the common case, is not small: no call to ask)
        if (not args or type(args[0]) is not LazyTensor) and self._all_small(args):
            return self._run_eager(func, args, kwargs, "small tensors")
        found = _ACTIONS_BY_ID.get(id(func))  # (lazy_ops.action_by_id, inline: once per op)
        act = found[1] if found is not None and found[0] is func else _action_by_id(func)
        if act is _VIEW and not (isinstance(args[0], LazyTensor) and args[0].pending):
            # a view of a real tensor stays one (writes through it reach the tensor)
            return self._run_eager(func, args, kwargs, "view of a real tensor")
        if act is not _EAGER:
            try:
                return self._record(func, act, args, kwargs)
            except _Eager as why:
                reason = why.args[0]
        else:
            if func in _NEW_TENSOR_OPS and isinstance(args[0], torch.Tensor):
                return self._run_new(func, args, kwargs)
            reason = "unsupported op"
        return self._run_eager(func, args, kwargs, reason)

    def _all_small(self, args) -> bool:
        """Every top-level argument is a real tensor below min_tensor_size, or not a tensor."""
        limit, seen = self.min_tensor_size, False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in _PLAIN or a.numel() >= limit:
                    return False
                seen = True
        return seen

    def _run_eager(self, func, args, kwargs, reason: str):
        """Run `func` through PyTorch, first flushing the pending graph if the op reads
        or writes what it holds (`reason` is counted as the sync's reason)."""
        if reason == "small tensors":
            STATS.ops_small += 1
        else:
            STATS.ops_eager += 1
        touches, placeholders = self._touches_pending(func, args, kwargs)
        if touches:
            if func is aten._local_scalar_dense.default:
                reason = "value read (item/bool/tolist)"
            log.debug("lazy sync before %s: %s", func, reason)
            self.flush(reason)
        if placeholders:
            args, kwargs = _compat.tree_map_only(LazyTensor, LazyTensor.value, (args, kwargs))
        return func(*args, **kwargs)

    def _run_new(self, func, args, kwargs):
        """`new_full`/`new_zeros`/... reads only its first argument's dtype and device (no data,
        no layout): it runs on an empty tensor of those, with no flush where that argument is
        pending or has a pending write (lerp's decomposition makes its weight this way)."""
        STATS.ops_eager += 1
        like = args[0]
        return func(torch.empty(0, dtype=like.dtype, device=like.device), *args[1:], **kwargs)

    def _touches_pending(self, func, args, kwargs) -> tuple:
        """(whether running `func` now needs the pending graph run first: it reads a pending
        value, or writes a tensor the pending graph reads or writes; whether a placeholder
        is among its arguments). One pass over the tensors: this runs for every op of a
        region that is not recorded (small tensors among large ones, sync points)."""
        pending = bool(self.graph.nodes or self.writes)
        touches = pending and self._writes_pending_input(func, args, kwargs)
        placeholders = False
        writes = self.writes
        for t in _tensors(args, kwargs):
            if isinstance(t, LazyTensor):
                placeholders = True
                if t._real is None:
                    touches = pending
                    continue
            if writes and not touches and (id(t) in writes or _storage(t) in self.write_storages):
                touches = True
        return touches, placeholders

    def _writes_pending_input(self, func, args, kwargs) -> bool:
        graph = self.graph
        for i, name in lazy_ops.written_arguments(func):
            value = args[i] if i < len(args) else kwargs.get(name)
            for t in (value if isinstance(value, (list, tuple)) else (value,)):
                if not isinstance(t, torch.Tensor):
                    continue
                if isinstance(t, LazyTensor) or id(t) in graph.input_slots or id(t) in self.writes:
                    return True
                storage = _storage(t)
                if storage in graph.input_storages or storage in self.write_storages:
                    return True
        return False

    # -- recording ------------------------------------------------------------------
    def _record(self, func, act, args, kwargs):
        """Record `func` (or raise _Eager): its node's template and signature, the result's
        metadata (one trie step, `kitsune.lazy.graph.STEPS`, for a graph seen before) and
        the placeholder. This runs for every recorded op: kept flat on purpose."""
        if act is _INPLACE:
            return self._record_inplace(func, args, kwargs)
        if len(self.graph.nodes) >= self.max_pending_ops:
            self.flush("max pending ops")
        graph = self.graph
        inputs_before, scalars_before = len(graph.inputs), len(graph.scalars)
        try:
            plain = None if kwargs else _plain_arguments(self, args)
            if plain is not None:
                (args_t, signature), kwargs_t, floats = plain, (), None
            else:
                refs = _Refs(self, func, args)
                args_t, kwargs_t, signature = refs.arguments(args, kwargs)
                floats = tuple(refs.floats) if refs.floats else None
            if act is _DECOMPOSE:
                meta = self._meta(func, args, kwargs, signature)
            else:  # (id(func): hashes without a Python frame; OpOverloads live as long as torch.ops)
                key = (graph.state, id(func), args_t, kwargs_t, signature, floats)
                found = _STEPS.get(key)
                if found is None:
                    meta = self._meta(func, args, kwargs, signature)
                    if type(meta) is list:
                        raise _Eager("several results")
                    found = _step(key, meta)
                state, meta, size = found
                if size > graph.largest:
                    graph.largest = size
        except _Eager:
            graph.rollback(inputs_before, scalars_before)
            raise
        if act is _DECOMPOSE:
            return self._decompose(func, args, kwargs, meta, signature)
        node = len(graph.nodes)  # graph.add, inline
        graph.nodes.append((func, args_t, kwargs_t))
        graph.metas.append(meta)
        graph.state = state
        STATS.ops_recorded += 1
        if _POSITIONAL:  # (LazyTensor.__new__, inline; positional arguments parse faster)
            result = _placeholder(LazyTensor, meta[0], meta[1], meta[2], None, meta[3], _STRIDED, meta[4])
        else:
            result = _placeholder(LazyTensor, meta[0], strides=meta[1], storage_offset=meta[2],
                                  dtype=meta[3], device=meta[4])
        result._region, result._node, result._meta = self, node, meta
        if act is _VIEW and isinstance(args[0], LazyTensor) and args[0].pending:
            args[0]._has_views = True
            result._view_of = (args[0], func, args[1:], kwargs)
        self.wrappers.append(result)
        return result

    def _meta(self, func, args, kwargs, signature):
        """Eager's metadata for the result, from fake tensors (cached by the argument
        layouts). A failing fake run makes the op run eagerly: it raises there, at the op.
        A result of a dtype the code generators lack runs eagerly too."""
        key = (func, signature)
        meta = _META_CACHE.get(key)
        if meta is None:
            if len(_META_CACHE) >= _CACHE_LIMIT:  # shapes that never repeat: start again
                _META_CACHE.clear()
            meta = _META_CACHE[key] = _check_result(_fake_meta(func, args, kwargs))
        if type(meta) is str:
            raise _Eager(meta)
        return meta

    def _decompose(self, func, args, kwargs, meta, signature):
        """Record `func` as its decomposition: traced on the first call with these
        argument layouts (run with this mode active), replayed after (kitsune.lazy.macro).
        Eager's layout is checked; a different one runs eagerly."""
        key = (func, signature)
        recipe = _RECIPES.get(key)
        flat = macro.flat_arguments(args, kwargs)
        if recipe is not None and recipe.matches(flat):
            result = recipe.replay(self._dispatch, flat)
        else:
            result = self._trace(func, args, kwargs, key)
        several = type(meta) is list
        results = tuple(result) if several and isinstance(result, (tuple, list)) else (result,)
        metas = meta if several else [meta]
        if len(results) != len(metas) or not all(
                isinstance(r, LazyTensor) and r._meta[:2] == m[:2] and r._meta[3:] == m[3:]
                for r, m in zip(results, metas)):
            raise _Eager("decomposition differs from eager")
        return results if several else result

    def _trace(self, func, args, kwargs, key):
        outer, self.trace = self.trace, macro.Trace(args, kwargs)
        try:
            with self:
                result = lazy_ops.decompositions()[func](*args, **kwargs)
            if len(_RECIPES) >= _CACHE_LIMIT:
                _RECIPES.clear()
            recipe = self.trace.finish(result)
            older = _RECIPES.get(key) if func in lazy_ops.FLOATS_PASSED_THROUGH else None
            _RECIPES[key] = recipe if older is None else macro.generalize(older, recipe)
        except macro.NotReplayable as why:
            log.debug("lazy region: %s is decomposed at every call: %s", func, why)
            _RECIPES.pop(key, None)
        finally:
            self.trace = outer
        return result

    def _record_inplace(self, func, args, kwargs):
        target = args[0]
        functional = lazy_ops.functional_of(func)
        if isinstance(target, LazyTensor) and not target.pending:
            target = target.value()
        lazy_target = isinstance(target, LazyTensor)
        if lazy_target and (target._view_of is not None or target._has_views):
            raise _Eager("in-place write through a view")
        if not lazy_target and self.writes and id(target) not in self.writes and \
                _storage(target) in self.write_storages:
            raise _Eager("in-place write to an alias")
        result = self._record(functional, lazy_ops.action(functional), args, kwargs)
        want = target._meta if lazy_target else meta_of(target)
        if result._meta[3] != want[3]:
            if not torch.can_cast(result._meta[3], want[3]):
                raise _Eager("in-place result cannot be cast")
            result = self._record(aten._to_copy.default, lazy_ops.RECORD, (result,), {"dtype": want[3]})
        if result._meta[:2] != want[:2]:
            raise _Eager("in-place result of another shape or layout")
        if lazy_target:
            target._node = result._node
        else:
            self.writes[id(target)] = (target, result._node)
            self.write_storages.add(_storage(target))
        return args[0]

    # -- flushing -------------------------------------------------------------------
    def flush(self, reason: str) -> None:
        """Compute what the pending graph holds that is still wanted: the live
        placeholders (they become real tensors) and the deferred writes."""
        if not self.graph.nodes and not self.writes:
            self.graph.device = None
            return
        with _compat.disable_dispatch_modes():
            self._flush(reason)

    def _flush(self, reason: str) -> None:
        graph, writes = self.graph, list(self.writes.values())
        live, views = [], []
        for w in _live(self.wrappers):
            (live if w._view_of is None else views).append(w)
        forwarding = self.forwarding
        self._reset()
        self.forwarding = forwarding
        outputs = tuple(dict.fromkeys([w._node for w in live] + [node for _, node in writes]))
        STATS.sync_reasons[reason] += 1
        log.debug("lazy region flush (%s): %d ops recorded, %d values wanted", reason, len(graph), len(outputs))
        if not outputs:
            return
        STATS.graphs_flushed += 1
        values = dict(zip(outputs, self._compute(graph, outputs)))
        shared = {w._node for w in live}
        with torch.no_grad():  # recorded writes were to tensors outside autograd (else they ran eagerly)
            for target, node in writes:  # before the swaps below take the value objects
                _write_back(target, values[node], node in shared)
        taken = set()
        for w in live:  # each placeholder gets its own tensor object (two may share a node)
            value = values[w._node]
            w._real = _restrided(value.detach() if id(value) in taken else value, w._meta)
            taken.add(id(value))
        for w in views:  # views of the values, as eager's are views of its tensors
            base, func, rest, kwargs = w._view_of
            w._real = func(base._real if isinstance(base, LazyTensor) else base, *rest, **kwargs)
        # views first: a view placeholder holds its base's placeholder (autograd's view
        # tracking), which blocks the base's swap until the view's is done
        for w in reversed(views):
            self._swap(w)
        for w in live:
            self._swap(w)

    def _compute(self, graph: PendingGraph, outputs: tuple) -> list:
        if graph.largest < self.min_tensor_size or not self.config.cpu_fusion and graph.device.type == "cpu":
            return run_eagerly(graph, outputs)
        key = graph.key(outputs)
        compiled = GRAPH_CACHE.get(key)
        if compiled is None:
            STATS.cache_misses += 1
            try:
                compiled = compile_pending(graph, outputs, self.config)
            except Exception as error:  # noqa: BLE001 - never crash the user's code
                log.warning("lazy region: the recorded graph runs eagerly: %s: %s", type(error).__name__, error,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                compiled = _EagerGraph(outputs)
            GRAPH_CACHE.put(key, compiled)
        else:
            STATS.cache_hits += 1
        if isinstance(compiled, _EagerGraph):
            return run_eagerly(graph, outputs)
        try:
            values = call_compiled(compiled, graph)
        except Exception as error:  # noqa: BLE001 - never crash the user's code: eager raises its own errors
            log.warning("lazy region: the compiled graph failed, its ops run eagerly: %s: %s",
                        type(error).__name__, error, exc_info=log.isEnabledFor(logging.DEBUG))
            return run_eagerly(graph, outputs)
        STATS.graphs_compiled += 1
        return values

    def _swap(self, wrapper: LazyTensor) -> None:
        """Make the placeholder the real tensor (else it forwards to `_real`)."""
        value = wrapper._real
        if wrapper._meta[2] == value.storage_offset() or value.numel() == 0:
            wrapper._real = None  # else the swapped-out placeholder would keep itself alive
            try:
                torch.utils.swap_tensors(wrapper, value)
                return
            except RuntimeError:
                wrapper._real = value
        self.forwarding.append(wrapper)

    def finish(self) -> None:
        """At the end of the region: flush, then make the placeholders that could not
        become real tensors during dispatch real now."""
        self.flush("region exit")
        with _compat.disable_dispatch_modes():
            for w in self.forwarding:
                if type(w) is LazyTensor and w._real is not None:
                    value, w._real = w._real, None
                    try:
                        torch.utils.swap_tensors(w, value)
                    except RuntimeError:  # e.g. the base of views: it keeps forwarding
                        w._real = value
        self.forwarding = []


class _EagerGraph:
    """Cache entry of a graph that failed to compile: it runs eagerly."""

    def __init__(self, outputs):
        self.outputs = outputs


def _unreferenced_count() -> int:
    """What sys.getrefcount says of an object only a list holds, read as `_live` reads it
    (the list and the call's argument; Python versions differ in counting the latter)."""
    held = [object()]
    return min(sys.getrefcount(held[i]) for i in range(1))


_UNREFERENCED = _unreferenced_count()


def _live(wrappers: list):
    """Placeholders referenced from anywhere but this list: the values the user can still read."""
    for i in range(len(wrappers)):
        if sys.getrefcount(wrappers[i]) > _UNREFERENCED:
            yield wrappers[i]


def _write_back(target: torch.Tensor, value: torch.Tensor, shared: bool) -> None:
    """Give `target` its new value. Where nothing else can see either storage (no view,
    no other tensor, the same layout), the target takes the value's storage (`set_`: no
    copy, as if the kernel had written in place); else the value is copied in."""
    if not shared and _sole_owner(target) and _sole_owner(value) and target.stride() == value.stride() \
            and target.storage_offset() == 0 == value.storage_offset() and target.dtype == value.dtype \
            and target.device == value.device and target.shape == value.shape and target.numel() > 0:
        target.set_(value)
    else:
        target.copy_(value)


def _sole_owner(t: torch.Tensor) -> bool:
    """No other tensor (a view, an alias) uses t's storage."""
    count = _compat.storage_use_count_fn()
    if count is None or type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return False
    storage = t.untyped_storage()
    return count(storage._cdata) == 2 and storage.nbytes() == t.numel() * t.element_size()  # t's, and `storage`


def _tensors(args, kwargs):
    """The tensors among an op's arguments (aten arguments nest at most one list deep)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif type(a) in (list, tuple):
            for t in a:
                if isinstance(t, torch.Tensor):
                    yield t


def _restrided(value: torch.Tensor, meta) -> torch.Tensor:
    """`value` with eager's strides and dtype (a copy only where they differ)."""
    shape, stride, _, dtype, _ = meta
    if value.stride() != stride and value.numel() > 1 or value.dtype != dtype:
        return torch.empty_strided(shape, stride, dtype=dtype, device=value.device).copy_(value)
    return value


