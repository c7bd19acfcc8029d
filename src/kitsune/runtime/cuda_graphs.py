"""Replay a compiled graph as one CUDA graph.

A transformer's pass on the GPU is often bound by the host: hundreds of
kernel launches, each paying Python and driver time. Once a graph's kernels
are built, `CudaGraphRunner` records the whole graph on its third call (two
ordinary calls first build and warm every kernel) and replays the recording
afterwards: one launch for the whole graph.

What stays exactly as eager:
- inputs: an input that arrives at the same address on every call (a weight,
  or an activation saved by a replayed forward graph) is read in place, so an
  in-place update of a weight is seen by the next call; an input whose
  address changes (token ids, a new batch) is copied into the recording's own
  buffer before each replay. A call where a weight moved, or where an input
  has other strides, runs the graph normally. The graph is recorded again
  (at most `MAX_RERECORDS` times) when an input copied in keeps its address
  for three calls (the forward graph started replaying, so the backward's
  saved activations stopped moving: they are then read in place), and, for a
  training graph, when an input read in place moves (the graph that makes it
  was recorded again: it is then copied in).
- outputs of an inference graph are fresh tensors on every call (copied out
  of the recording's buffers), so a result kept from one call is never
  overwritten by the next.
- outputs of a training graph (forward activations saved for the backward,
  gradients) are handed out in place, as tensors on the recording's own
  memory: copying them out would cost as much as the launches saved. A
  replay would overwrite them, so a call replays only when none of them is
  still alive (their storages' use counts are back to the runner's own);
  otherwise it runs the graph normally, which is always right. A training
  loop frees them before the next step (the backward consumes the saved
  activations; `zero_grad()` drops the gradients), so its steps replay.
  A forward graph's own outputs (what the model returns, as opposed to the
  activations it saves for the backward) are copied out like an inference
  graph's: a loop that keeps `out = model(x)` bound while it calls the model
  again would otherwise stop every other replay. So are outputs of one
  element (a loss kept for logging).
- anything that cannot be recorded (a CPU tensor, a host synchronisation,
  random numbers, in-place updates) keeps the graph running normally, with
  the reason logged.

A training graph's recording keeps its own memory (its saved activations or
gradients, and its intermediates) for as long as the compiled model lives, so
a training graph is recorded only where launches cost time: its last warm-up
call is timed, and a graph whose GPU work outlasts its launches more than
`GPU_BOUND_RATIO` times (a large batch: the launches run ahead of the GPU)
runs without CUDA graphs, with the times logged. (On an H100 a GPT-2 training
step at 8x1024 tokens, GPU-bound, peaked at 14.3 GiB replayed against 6.0 GiB
on its first, normal call.)
"""
from __future__ import annotations

import logging
import time
import weakref

import torch
from torch import fx
from kitsune import _compat
from kitsune._compat import StorageWeakRef
from kitsune.sizes import hint, numel_of

log = logging.getLogger("kitsune")

WARMUP_CALLS = 2
# Worth it when the host time of the launches saved clearly exceeds the time of
# copying the outputs out of the recording: about 6 us of host time per op
# (a FusedGroupCall or an aten call from Python), outputs copied at ~2 TB/s.
HOST_US_PER_OP = 6.0
COPY_BYTES_PER_US = 2.0e6

_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "randperm", "philox", "seed")


def cuda_graph_blocker(gm: fx.GraphModule, example_inputs, compiled=None, training: bool = False) -> str | None:
    """Why this graph cannot (or should not) be recorded, or None. `compiled`
    (the graph that will run) decides whether replaying pays for itself: an
    inference graph's outputs are copied out of the recording, a training
    graph's are not (`CudaGraphRunner`)."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "inputs not all on a CUDA device"
    if len({t.device for t in tensors}) > 1:
        return "inputs on several devices"
    if any(not isinstance(t, (torch.Tensor, int, torch.SymInt)) for t in example_inputs):
        return "inputs that are neither tensors nor sizes"
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if any(word in name for word in _RANDOM):
            return f"random numbers ({name})"
        if _compat.op_is_mutable(node.target):
            return f"in-place op {name}"
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type != "cuda":
            return f"{node.name} makes a tensor on {val.device}"
    if not isinstance(compiled, fx.GraphModule):
        return None
    if training:
        if not _compat.training_replay_supported():
            return "this PyTorch cannot tell when a replay's outputs are free"
        ops = _launches(compiled)
        return None if ops >= 2 else f"{ops} op(s): nothing to save by replaying"
    return replay_cost_blocker(gm, compiled)


def replay_cost_blocker(gm: fx.GraphModule, compiled: fx.GraphModule) -> str | None:
    """Why replaying would not pay for itself, or None."""
    ops = _launches(compiled)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out_bytes = sum(hint(numel_of(v)) * v.element_size() for v in _tensors(out.args[0]))
    saved_us, copy_us = ops * HOST_US_PER_OP, out_bytes / COPY_BYTES_PER_US
    if saved_us < 2 * copy_us:
        return (f"copying its outputs out of a recording ({out_bytes / 1e6:.0f} MB, ~{copy_us:.0f} us) "
                f"would cost more than the launch time it saves ({ops} ops, ~{saved_us:.0f} us)")
    return None


def _launches(compiled: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and not _is_view(n) for n in compiled.graph.nodes)


def _is_view(node) -> bool:
    from kitsune.ir.graph import is_view
    import operator
    return node.target is operator.getitem or is_view(node)


def _tensors(args):
    if isinstance(args, fx.Node):
        val = args.meta.get("val")
        return [val] if isinstance(val, torch.Tensor) else []
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in _tensors(a)]
    return []


MAX_SIZE_RECORDINGS = 4


class SizeKeyedRunner:
    """Replay for a graph over symbolic sizes: one `CudaGraphRunner` per set of
    size values (the graph's int arguments: AOTAutograd passes every symbolic
    size of its inputs as one), the `MAX_SIZE_RECORDINGS` most recently used
    kept; an older one is dropped with its memory. Each runner warms up,
    records and checks its inputs as for a static graph."""

    def __init__(self, fn, name: str, training: bool = False, copy_out=(), limit: int = MAX_SIZE_RECORDINGS,
                 before_replay=(), restride=None, on_record=None):
        self.fn, self.name, self.training, self.copy_out, self.limit = fn, name, training, copy_out, limit
        self.before_replay, self.restride, self.on_record = before_replay, restride or {}, on_record
        self.runners: dict = {}  # size values -> runner, least recently used first
        self.dropped = 0

    def __call__(self, *args):
        key = tuple(a for a in args if type(a) is int)
        runner = self.runners.pop(key, None)
        if runner is None:
            runner = CudaGraphRunner(self.fn, f"{self.name} at sizes {key}", self.training, self.copy_out,
                                     self.before_replay, self.restride, self.on_record)
            if len(self.runners) >= self.limit:
                oldest = next(iter(self.runners))
                self.runners.pop(oldest)._drop()
                self.dropped += 1
        self.runners[key] = runner  # most recently used last
        return runner(*args)

    @property
    def replays(self) -> int:
        return sum(r.replays for r in self.runners.values())


class CudaGraphRunner:
    """Runs `fn` normally for `WARMUP_CALLS` calls, then records it and replays.
    `training`: outputs are handed out in place (see the module docstring).
    `before_replay`: callables run with the call's arguments before each replay
    (host work the recording skips: folded weights checked against their
    sources, kitsune.capture.fold); they must keep the addresses the recording
    reads.
    `restride` (inference graphs): {output position: strides}: outputs that `fn`
    returns in other strides (a padded matmul's view, kitsune.runtime.matmul)
    and that reach the caller in these, copied once (out of the recording, or
    after a normal run)."""

    def __init__(self, fn, name: str, training: bool = False, copy_out=(), before_replay=(), restride=None,
                 on_record=None):
        self.restride = dict(restride or {})
        self.on_record = on_record  # on_record(seconds) after each recording (the compile-time report)
        self.record_fn = fn
        if self.restride:
            from kitsune.runtime.matmul import restrided
            fn = restrided(fn, self.restride)
        self.fn, self.name, self.training = fn, name, training
        self.before_replay = tuple(before_replay)
        self.copy_out = frozenset(copy_out)  # training: outputs copied out all the same (the user's own)
        self.calls = 0
        self.graph = None
        self.disabled: str | None = None
        self.rerecords = 0
        self.replays = 0
        self.live_output_calls = 0  # calls run normally because an output was still alive
        self._last_ptrs = None
        self._static_inputs = None  # the recording's inputs
        self._copied = ()           # positions of inputs copied in before each replay
        self._steady = []           # per copied input: calls in a row it arrived at one address
        self._restless = set()      # inputs that moved after being read in place (a fresh zero gradient)
        self._outputs = None
        self._handout = None        # training: how each output is handed out
        self._watch = ()            # training: (storage weak ref, use count when free)
        self._forget = None         # training: drops the recording's storages from _RECORDING_MEMORY

    def __call__(self, *args):
        if self.disabled is not None:
            return self.fn(*args)
        if self.graph is not None:
            return self._replay(args)
        self.calls += 1
        ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
        if self.calls <= WARMUP_CALLS:
            self._last_ptrs = ptrs
            if self.calls == WARMUP_CALLS and self.training:
                return self._warm_call_or_disable(args)
            return self.fn(*args)
        copied = tuple(i for i, (a, b) in enumerate(zip(ptrs, self._last_ptrs))
                       if isinstance(args[i], torch.Tensor) and a != b)
        return self._record_or_run(args, copied)

    def _warm_call_or_disable(self, args):
        """The last warm-up call of a training graph, timed: a graph whose GPU work
        outlasts its launches `GPU_BOUND_RATIO` times over is GPU-bound (the launches
        run ahead of the GPU and cost it nothing), so a recording would save little
        and hold its memory (saved activations and gradients) for the model's life."""
        out, host_s, gpu_s = _time_call(self.fn, args)
        if host_s is not None and gpu_s > GPU_BOUND_RATIO * host_s:
            self.disable(f"GPU-bound: {gpu_s * 1e3:.2f} ms of GPU work a call against {host_s * 1e3:.2f} ms "
                         f"of launches (over {GPU_BOUND_RATIO:g}x): a recording would save little and hold "
                         f"its memory")
        return out

    def disable(self, reason: str) -> None:
        self.disabled = reason
        log.info("%s runs without CUDA graphs: %s", self.name, reason)

    def _record_or_run(self, args, copied):
        try:
            self._record(args, copied)
            short = _memory_short(next(a.device for a in args if isinstance(a, torch.Tensor)))
        except Exception as error:  # noqa: BLE001 - the graph still runs normally
            self._drop()
            self.disable(f"recording failed: {type(error).__name__}: {error}")
            return self.fn(*args)
        if short is not None:  # the recording's memory would be missed by the rest of the step
            self._drop()
            self.disable(short)
            return self.fn(*args)
        return self._replay(args)

    def _drop(self) -> None:
        """Lets the recording and its memory go."""
        if self._forget is not None:
            self._forget()
        self.graph = self._outputs = self._handout = self._static_inputs = None
        self._watch = ()

    def _record(self, args, copied):
        static = list(args)
        for i in copied:
            static[i] = torch.empty_strided(args[i].shape, args[i].stride(), dtype=args[i].dtype,
                                            device=args[i].device)
            static[i].copy_(args[i])
        for hook in self.before_replay:  # up to date now, so the recording launches none of their work
            hook(args)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # thread-local: a backward graph is recorded on autograd's device thread
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.record_fn(*static)
        if self.training:  # keeps only what it hands out from the recording's memory
            self._handout, self._watch, outputs = _handout_plan(outputs, static, copied, self.copy_out)
            for ref, _ in self._watch:
                _RECORDING_MEMORY[ref.cdata] = ref
            # forgotten with this recording (re-recorded) or with the runner (model freed)
            self._forget = weakref.finalize(self, _forget, [ref.cdata for ref, _ in self._watch])
        # Inputs read in place are kept as their address, not as tensors: holding a
        # backward's saved activations would keep the forward's outputs alive.
        self._static_inputs = [_InPlace(a) if isinstance(a, torch.Tensor) and i not in copied else a
                               for i, a in enumerate(static)]
        self.graph, self._copied = graph, copied
        self._steady = [0] * len(copied)
        self._last_ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
        self._outputs = outputs
        out = ""
        if self.training:
            plan = self._handout[1]
            out = f", {sum(how == 'copy' for how, _ in plan)} of {len(plan)} outputs copied out"
        log.info("%s recorded as one CUDA graph (%d of %d inputs copied in per call%s)",
                 self.name, len(copied), len(args), out)
        if self.on_record is not None:
            self.on_record(time.perf_counter() - start)

    def _replay(self, args):
        static = self._static_inputs
        moved = []
        for i, (a, s) in enumerate(zip(args, static)):
            if isinstance(s, _InPlace):
                if not isinstance(a, torch.Tensor) or a.stride() != s.stride or a.shape != s.shape \
                        or a.dtype != s.dtype:
                    return self.fn(*args)
                if a.data_ptr() != s.ptr:
                    moved.append(i)
            elif isinstance(s, torch.Tensor):  # copied in
                if not isinstance(a, torch.Tensor) or a.shape != s.shape or a.stride() != s.stride() \
                        or a.dtype != s.dtype:
                    return self.fn(*args)
            elif a != s:
                return self.fn(*args)
        settled = self._settled(args) if self._copied else ()
        if (settled or (moved and self.training)) and self.rerecords < MAX_RERECORDS:
            return self._rerecord(args, settled, moved)
        if moved:
            return self.fn(*args)  # an input read in place moved (another weight): run normally
        if self.training and self._an_output_alive():
            return self._output_alive(args)
        for i in self._copied:
            static[i].copy_(args[i])
        for hook in self.before_replay:
            hook(args)
        self.graph.replay()
        self.replays += 1
        if self.training:
            return _hand_out(self._handout, args)
        return _fresh(self._outputs, self.restride)

    def _settled(self, args) -> list:
        """The inputs copied in at every replay that have now arrived at one address
        three calls in a row, on the memory of another recording (a replayed forward
        graph's saved activations), so they may be read in place after a re-recording.
        A tensor made afresh at every call (a zero gradient) may land at one address
        for a while too; it is not read in place."""
        settled = []
        for k, i in enumerate(self._copied):
            ptr = args[i].data_ptr()
            self._steady[k] = self._steady[k] + 1 if ptr == self._last_ptrs[i] else 0
            self._last_ptrs[i] = ptr
            if self._steady[k] >= 2 and i not in self._restless and _in_a_recording(args[i]):
                settled.append(i)
        return settled

    def _rerecord(self, args, settled, moved):
        """Records again, reading `settled` inputs in place and copying `moved` ones in
        (a training graph's inputs read in place move when the graph that makes them
        is re-recorded)."""
        if self.training and self._an_output_alive():
            return self._output_alive(args)  # try again at a later call
        self._restless.update(moved)  # read in place once and moved: copied in from now on
        copied = tuple(sorted((set(self._copied) - set(settled)) | set(moved)))
        self.rerecords += 1
        log.info("%s re-recorded: %d input(s) stopped moving, %d moved", self.name, len(settled),
                 len(moved))
        self._drop()
        return self._record_or_run(args, copied)

    def _an_output_alive(self) -> bool:
        """Whether a storage handed out by the last replay is still in use."""
        return any(_use_count(ref.cdata) != free for ref, free in self._watch)

    def _output_alive(self, args):
        self.live_output_calls += 1
        if self.live_output_calls == 1:
            log.info("%s ran without replaying: an output of its last replay is still alive "
                     "(a replay would overwrite it)", self.name)
        return self.fn(*args)


class _InPlace:
    """An input the recording reads where it found it: its address and layout."""
    __slots__ = ("ptr", "shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.ptr, self.shape, self.stride, self.dtype = t.data_ptr(), t.shape, t.stride(), t.dtype


# A recording keeps its memory (its outputs and intermediates) for as long as it
# lives; where less than this share of the device's memory is left available
# after recording, the recording is let go and the graph runs normally, so that
# the rest of a training step (the optimizer, the next forward) finds the memory
# eager would have had.
MIN_FREE_SHARE = 0.10


# A training graph whose GPU time is over this many times its host (launch) time
# is not recorded (CudaGraphRunner._warm_call_or_disable).
GPU_BOUND_RATIO = 5.0


def _time_call(fn, args):
    """(fn(*args), host seconds, GPU seconds) of one call on a CUDA device, the
    queue drained first, so the GPU span is the longer of the launches and the
    work; (output, None, None) off CUDA or where timing fails."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None or device.type != "cuda":
        return fn(*args), None, None
    try:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    except RuntimeError:
        return fn(*args), None, None
    begin = time.perf_counter()
    out = fn(*args)
    host = time.perf_counter() - begin
    end.record()
    end.synchronize()
    return out, host, start.elapsed_time(end) / 1e3


def _memory_short(device: torch.device) -> str | None:
    """Why a recording just made on `device` must be let go for memory, or None."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if available >= MIN_FREE_SHARE * total:
        return None
    return (f"only {available / 2**30:.1f} of {total / 2**30:.0f} GiB of device memory left available after "
            f"recording (less than {MIN_FREE_SHARE:.0%}): the recording's memory is left to the rest of the step")


# Outputs of at most this many elements are copied out of a training graph's
# recording (a loss kept for logging must not stop the replays); larger ones are
# handed out in place.
COPY_OUT_NUMEL = 1
MAX_RERECORDS = 4


# Storages that training recordings hand out in place (weak references by storage).
_RECORDING_MEMORY: dict = {}


def _forget(cdatas) -> None:
    for cdata in cdatas:
        _RECORDING_MEMORY.pop(cdata, None)


def _use_count(cdata) -> int:
    return _compat.storage_use_count(cdata)


def _in_a_recording(t: torch.Tensor) -> bool:
    return StorageWeakRef(t.untyped_storage()).cdata in _RECORDING_MEMORY


def _handout_plan(outputs, static, copied, copy_out=frozenset()):
    """How each output of a training recording is handed out, and which storages
    must be free before a replay. Returns ((container type, [(how, what)]), watch,
    outputs to keep): how is "arg" (the caller's own input, which the graph
    returned as is), "view" (a view of an input read in place, rebuilt on the
    caller's tensor: kept as a tensor, it would pin that input's memory, a
    forward graph's saved activation say, and stop the forward's replays),
    "copy", "alias" or "value"."""
    in_place = {}
    for i, a in enumerate(static):
        if isinstance(a, torch.Tensor) and i not in copied:
            in_place.setdefault(a.untyped_storage().data_ptr(), i)
    plan, refs, kept = [], {}, []
    for k, out in enumerate(outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        keep = None
        if not isinstance(out, torch.Tensor):
            plan.append(("value", out))
        elif (same := next((i for i, a in enumerate(static) if a is out), None)) is not None:
            plan.append(("arg", same))
        elif out.numel() <= COPY_OUT_NUMEL or k in copy_out:
            plan.append(("copy", out))
            keep = out
        else:
            storage = out.untyped_storage()
            base = in_place.get(storage.data_ptr())
            delta, rest = divmod(out.data_ptr() - static[base].data_ptr(), out.element_size()) \
                if base is not None else (0, 1)
            if base is not None and static[base].dtype == out.dtype and not rest:
                plan.append(("view", (base, tuple(out.shape), out.stride(), delta)))
            else:
                plan.append(("alias", out))
                keep = out
                if base is None:  # on the recording's memory (or a copied input's buffer)
                    ref = StorageWeakRef(storage)
                    refs.setdefault(ref.cdata, ref)
            del storage
        kept.append(keep)
    watch = tuple((ref, _use_count(cdata)) for cdata, ref in refs.items())
    return (type(outputs) if isinstance(outputs, (list, tuple)) else None, plan), watch, kept


def _hand_out(handout, args):
    kind, plan = handout
    result = []
    for how, what in plan:
        if how == "alias":
            result.append(what.detach())  # a new tensor on the recording's memory
        elif how == "view":
            i, shape, stride, delta = what
            result.append(args[i].as_strided(shape, stride, args[i].storage_offset() + delta))
        elif how == "copy":
            result.append(_fresh(what))
        elif how == "arg":
            result.append(args[what])
        else:
            result.append(what)
    return result[0] if kind is None else kind(result)


def _fresh(outputs, strides=None):
    """Outputs copied out of the recording, in their own strides or, at the top-level
    positions of `strides`, in those."""
    if isinstance(outputs, torch.Tensor):
        # empty_strided keeps every stride (clone makes a non-dense layout dense);
        # an expanded (overlapping) output cannot be written that way
        stride = outputs.stride() if strides is None else strides
        if any(st == 0 and n > 1 for st, n in zip(stride, outputs.shape)):
            return outputs.clone()
        fresh = torch.empty_strided(outputs.shape, stride, dtype=outputs.dtype, device=outputs.device)
        return fresh.copy_(outputs)
    if isinstance(outputs, (list, tuple)):
        strides = strides or {}
        return type(outputs)(_fresh(o, strides.get(i)) for i, o in enumerate(outputs))
    return outputs
