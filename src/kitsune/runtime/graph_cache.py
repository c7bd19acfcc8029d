"""Compiled graphs on disk: a second process compiling the same model skips
Kitsune's compiler (planning, lowering, code generation, kernel builds and
measured decisions), as Inductor's FX graph cache skips Inductor.

`graph_key(gm, example_inputs, kind, config)` hashes a normalised rendering of
the aten graph as the planner receives it (after the rewrites): per node its op,
name, target, arguments, and the metadata planning reads (the dtype, shape,
strides and device of its value, `source_fn_stack`, `original_aten`, `seq_nr`,
the partitioner's tags), plus the example inputs' dtypes, shapes and strides
(symbolic sizes by their hints), the graph's kind, the FusionConfig, the
launch choices, the environment switches that change code generation, the
Kitsune version and a hash of its source files, the torch version and the device (CUDA: name and capability; CPU: the
processor and thread count). Node names are part of the key, so a loaded entry
names the nodes of the very graph it is applied to.

An entry (`ENTRY_VERSION`, pickled) holds what the compiled graph and its
record need: per fused group the kernel name, the nodes it fuses, its inputs
and outputs (node names), its KernelSpec, its backend and what the backend
needs to load the built kernel (`Backend.kernel_state`), and the plan's
decisions and fallbacks (so `explain()` and the stats of a warm-started graph
say what a cold compile says); measured decisions are added after the first
call measured them (`update_measured`).

Entries live in ``KITSUNE_CACHE_DIR/graphs``, are written atomically under a
per-entry lock, and an entry that cannot be read (corrupt, written by another
entry version, a kernel file gone) is ignored with the reason logged: the
graph is then compiled as usual. `FusionConfig(graph_cache=False)` or
``KITSUNE_GRAPH_CACHE=0`` turns the cache off; a config with custom patterns
(user code the key cannot hash) is never cached.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import io
import logging
import os
import pickle
import platform

import torch
from torch import fx

from kitsune.cache import cache_dir, file_lock, write_atomic
from kitsune.config import FusionConfig
from kitsune.ir.scalar import Value

log = logging.getLogger("kitsune")

ENTRY_VERSION = 1
# environment variables that change what is generated or how it runs
_ENV = ("KITSUNE_BACKEND", "KITSUNE_TRITON_MATMUL", "TRITON_INTERPRET", "KITSUNE_CC")
# node metadata the planner and code generators read, besides the value
_META = ("original_aten", "seq_nr", "autograd_backward", "partitioner_tag")


def enabled(config: FusionConfig) -> bool:
    """Whether compiled graphs are cached: the config asks for it, KITSUNE_GRAPH_CACHE
    does not say 0, and the config holds no custom patterns."""
    if os.environ.get("KITSUNE_GRAPH_CACHE", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return config.graph_cache and not config.custom_patterns


def graph_key(gm: fx.GraphModule, example_inputs, kind: str, config: FusionConfig) -> str:
    """The hash naming `gm`'s entry (see the module docstring for what it covers)."""
    from kitsune.tuning.launch import launch_choices

    h = hashlib.sha256()
    for part in (f"v{ENTRY_VERSION}", kind, _environment(), _config_text(config), repr(launch_choices()),
                 _inputs_text(example_inputs), _device_text(gm, example_inputs)):
        h.update(part.encode())
        h.update(b"\0")
    sequence: dict = {}  # autograd sequence numbers, renumbered: a process-wide counter
    for node in gm.graph.nodes:
        h.update(_node_text(node, sequence).encode())
        h.update(b"\n")
    return h.hexdigest()[:40]


def _environment() -> str:
    import kitsune
    env = ",".join(f"{name}={os.environ.get(name, '')}" for name in _ENV)
    return f"kitsune {kitsune.__version__} {source_hash()} torch {torch.__version__} {env}"


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """Hash of Kitsune's own source files (once per process), as Inductor keys its
    caches by torch's: a changed planner or code generator (an edited checkout, a new
    release with the same version number) never loads a graph the old one compiled."""
    import kitsune
    root = os.path.dirname(kitsune.__file__)
    h = hashlib.sha256()
    for directory, subdirectories, files in sorted(os.walk(root)):
        subdirectories.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def _config_text(config: FusionConfig) -> str:
    """The config's fields, with sets sorted (their order changes between processes)."""
    values = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "graph_cache":
            continue
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        values.append(f"{f.name}={value!r}")
    return ";".join(values)


def _value_text(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({value.dtype},{tuple(value.shape)},{_strides(value)},{value.device.type},{value.requires_grad})"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_value_text(v) for v in value) + ")"
    return f"{type(value).__name__}:{value}"


def _strides(value: torch.Tensor):
    try:
        return tuple(value.stride())
    except RuntimeError:  # sparse and other layouts without strides
        return str(value.layout)


def _inputs_text(example_inputs) -> str:
    """Example inputs: their metadata; a SymInt (or int) by its value, the hint that
    planning chooses blocks and splits for."""
    parts = []
    for value in example_inputs or ():
        if isinstance(value, torch.SymInt):
            value = value.node.hint if value.node.has_hint() else str(value)
        parts.append(_value_text(value))
    return "|".join(parts)


def _node_text(node: fx.Node, sequence: dict) -> str:
    """One node, normalised: what planning reads of it, nothing that differs between
    two traces of one program (autograd's `seq_nr` counts every op the process ran:
    only which nodes share one matters)."""
    target = node.target if isinstance(node.target, str) else _callable_name(node.target)
    args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{n.name}")
    meta = node.meta
    stack = [(entry[0], _callable_name(entry[1])) for entry in meta.get("source_fn_stack") or ()
             if isinstance(entry, (tuple, list)) and len(entry) >= 2]
    extra = [(k, str(sequence.setdefault(meta[k], len(sequence)) if k == "seq_nr" else meta[k]))
             for k in _META if k in meta]
    return f"{node.op} {node.name} {target} {args!r} {_value_text(meta.get('val'))} {stack} {extra}"


def _callable_name(target) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if name else str(target)


def _device_text(gm: fx.GraphModule, example_inputs) -> str:
    devices = {v.device for v in example_inputs or () if isinstance(v, torch.Tensor)}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(v := node.meta.get("val"), torch.Tensor):
            devices.add(v.device)
    parts = []
    for device in sorted(devices, key=str):
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            parts.append(f"cuda {torch.cuda.get_device_name(index)} {torch.cuda.get_device_capability(index)} "
                         f"{torch.version.cuda}")
        else:
            parts.append(f"{device.type} {_cpu_model()} threads={torch.get_num_threads()}")
    return ";".join(parts)


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- entries --------------------------------------------------------------------------------------


def _path(key: str):
    return cache_dir("graphs") / f"{key}.pkl"


class _Pickler(pickle.Pickler):
    """Pickles a scalar `Value` by its constructor's arguments: its cached hash is
    built from Python's string hashes, which are salted per process, so a Value
    must recompute it where it is loaded (else it would equal no fresh Value)."""

    def reducer_override(self, obj):
        if type(obj) is Value:
            return Value, (obj.op, obj.args, obj.dtype, obj.attr)
        return NotImplemented


def dumps(entry: dict) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(entry)
    return buffer.getvalue()


@contextlib.contextmanager
def _no_gc():
    """Loading makes thousands of small objects: a cyclic collection of the heap a
    Dynamo capture leaves (0.5 s and more) would start in the middle of it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def loads(data: bytes):
    with _no_gc():
        return pickle.loads(data)


def load(key: str) -> dict | None:
    """The entry stored under `key`, or None (absent, or unreadable: logged)."""
    path = _path(key)
    if not path.exists():
        return None
    try:
        entry = loads(path.read_bytes())
        if not isinstance(entry, dict) or entry.get("version") != ENTRY_VERSION or entry.get("key") != key:
            raise ValueError(f"not a version-{ENTRY_VERSION} entry for this key")
    except Exception as error:  # noqa: BLE001 - a bad entry only costs a compile
        log.warning("ignoring compiled-graph cache entry %s: %s: %s", path, type(error).__name__, error)
        return None
    return entry


def store(key: str, entry: dict) -> bool:
    """Write `entry` under `key` (atomically, under the entry's lock); a failure is
    logged. Whether it was written."""
    path = _path(key)
    try:
        data = dumps(dict(entry, version=ENTRY_VERSION, key=key))
        with file_lock(path):
            write_atomic(path, data)
    except Exception as error:  # noqa: BLE001 - the cache must never break a compile
        log.warning("cannot cache the compiled graph %s: %s: %s", key[:12], type(error).__name__, error)
        return False
    return True


def update_measured(key: str, measured: dict) -> None:
    """Add the measured decisions `measured` ({kernel name: measurement}) to the
    entry under `key`, so that a later process applies them without timing."""
    path = _path(key)
    try:
        with file_lock(path):
            entry = load(key)
            if entry is None:
                return
            entry["measured"] = {**entry.get("measured", {}), **measured}
            write_atomic(path, dumps(entry))
    except Exception as error:  # noqa: BLE001
        log.warning("cannot cache the measured decisions of graph %s: %s: %s", key[:12],
                    type(error).__name__, error)
