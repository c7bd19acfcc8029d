"""FusionEngine: spec 01's entry point, over Kitsune's compile pipeline.

    from kitsune.fusion import FusionEngine, FusionConfig, FusionPattern

    engine = FusionEngine(config=FusionConfig(max_fusion_size=16))
    fast = engine.fuse(model)              # nn.Module, function, or fx.GraphModule
    fast(x).sum().backward()               # compiles on the first call (forward and backward)
    engine.get_fusion_stats()              # num_fused, efficiency, kernels, patterns, fallbacks, ...
    print(engine.explain())                # what fused into what, what did not and why
    engine.report("report.html")           # the graph with its fusion groups, kernel sources, times

    # A list of operations (spec 01 `engine.fuse(operations)`, spec 04 `['matmul', 'relu']`):
    layer = engine.fuse([("matmul", w), ("add", b), ("relu",)])
    y = layer(x)                           # relu(x @ w + b), compiled

Each step of an operation list is ``"name"`` or ``("name", *args)`` with an
optional trailing ``dict`` of keyword arguments; the running value is the
first argument: ``("matmul", w)`` is ``x @ w``, ``("softmax", -1)`` is
``softmax(x, -1)``, ``("linear", w, b)`` is ``F.linear(x, w, b)``. Tensor
arguments are kept as buffers of the returned module (they follow ``.to()``).
`OPERATIONS` lists the names.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from kitsune.config import FusionConfig
from kitsune.fusion.patterns import BUILTIN_PATTERNS, FusionPattern
from kitsune.report.stats import GLOBAL_STATS, FusionStats, TeeStats
from kitsune.tuning.measure import measuring

log = logging.getLogger("kitsune")


def _ln(x, shape=None, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, tuple(shape) if shape is not None else (x.shape[-1],), weight, bias, eps)


# name -> function(x, *args, **kwargs)
OPERATIONS = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "matmul": torch.matmul, "mm": torch.matmul,
    "bmm": torch.matmul, "linear": F.linear, "scale": torch.mul, "bias": torch.add,
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu, "elu": F.elu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
    "softplus": F.softplus, "mish": F.mish, "hardtanh": F.hardtanh, "relu6": F.relu6,
    "exp": torch.exp, "log": torch.log, "neg": torch.neg, "abs": torch.abs, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "sin": torch.sin, "cos": torch.cos, "erf": torch.erf, "square": torch.square,
    "reciprocal": torch.reciprocal, "clamp": torch.clamp, "where": lambda x, cond, other: torch.where(cond, x, other),
    "softmax": lambda x, dim=-1: torch.softmax(x, dim), "log_softmax": lambda x, dim=-1: torch.log_softmax(x, dim),
    "layer_norm": _ln, "dropout": F.dropout, "sum": torch.sum, "mean": torch.mean, "amax": torch.amax,
    "reshape": torch.reshape, "view": lambda x, *shape: x.view(*shape), "transpose": torch.transpose,
    "permute": torch.permute, "to": lambda x, *a, **k: x.to(*a, **k),
}


class FusedOperations(nn.Module):
    """A sequence of operations applied to one input: the module `FusionEngine.fuse(list)` compiles."""

    def __init__(self, operations):
        super().__init__()
        if isinstance(operations, (str, bytes)) or not hasattr(operations, "__iter__"):
            raise TypeError(f"operations must be a list of steps, got {type(operations).__name__}")
        steps = []
        for i, step in enumerate(operations):
            if isinstance(step, str):
                step = (step,)
            if not isinstance(step, (tuple, list)) or not step or not isinstance(step[0], str):
                raise TypeError(f"operations[{i}] must be 'name' or ('name', *args), got {step!r}")
            name, args = step[0].strip().lower(), list(step[1:])
            kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
            if name not in OPERATIONS:
                raise ValueError(f"operations[{i}]: unknown operation {step[0]!r}; known: {sorted(OPERATIONS)}")
            for j, arg in enumerate(args):
                if isinstance(arg, nn.Parameter):
                    self.register_parameter(f"op{i}_arg{j}", arg)
                    args[j] = ("attr", f"op{i}_arg{j}")
                elif isinstance(arg, torch.Tensor):
                    self.register_buffer(f"op{i}_arg{j}", arg)
                    args[j] = ("attr", f"op{i}_arg{j}")
                else:
                    args[j] = ("value", arg)
            steps.append((name, tuple(args), dict(kwargs)))
        if not steps:
            raise ValueError("operations is empty: give at least one operation")
        self.steps = steps

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.steps]

    def forward(self, x):
        for name, args, kwargs in self.steps:
            values = [getattr(self, a) if kind == "attr" else a for kind, a in args]
            if name == "dropout" and len(values) < 2:  # drops in training mode only, as nn.Dropout does
                kwargs = {**kwargs, "training": self.training}
            x = OPERATIONS[name](x, *values, **kwargs)
        return x

    def extra_repr(self) -> str:
        return " → ".join(self.names)


def _is_aten_graph(gm: fx.GraphModule) -> bool:
    from kitsune import _compat
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return bool(calls) and all("val" in n.meta for n in calls) and \
        all(isinstance(n.target, (_compat.OpOverload, _compat.HigherOrderOperator)) or
            getattr(n.target, "__name__", "") == "getitem" for n in calls)


class FusionEngine:
    """Compiles models with Kitsune and keeps what it did: stats, explanation, report.

    FusionEngine(enable_fusion=True, config=None, profile=False)
      enable_fusion: False compiles without fusing anything (every op runs through
                     PyTorch) but still detects patterns: `explain()` then says what
                     would fuse.
      config:        a FusionConfig (default FusionConfig()).
      profile:       time each fused kernel against the user's unfused ops on the first
                     real inputs; stats and reports then show measured speed-ups. A config
                     that sets min_fusion_benefit to other than its default asks for
                     measured decisions, so it turns profiling on too, on every entry
                     point (kitsune.tuning.measure.measuring).
    """

    def __init__(self, enable_fusion: bool = True, config: FusionConfig | None = None, profile: bool = False):
        if not isinstance(enable_fusion, bool):
            raise TypeError(f"FusionEngine enable_fusion must be bool, got {type(enable_fusion).__name__}")
        if not isinstance(profile, bool):
            raise TypeError(f"FusionEngine profile must be bool, got {type(profile).__name__}")
        if config is None:
            config = FusionConfig()
        if not isinstance(config, FusionConfig):
            raise TypeError(f"FusionEngine config must be a kitsune.fusion.FusionConfig, got {type(config).__name__}")
        self.enable_fusion = enable_fusion
        self.profile = measuring(config, profile)
        self._config = config
        self._stats = FusionStats()

    # -- configuration -------------------------------------------------------------

    @property
    def config(self) -> FusionConfig:
        return self._config

    @property
    def patterns(self) -> dict[str, FusionPattern]:
        """Every pattern the engine looks for: built-in ones and registered ones."""
        return {**BUILTIN_PATTERNS, **{p.name: p for p in self._config.custom_patterns}}

    def register_pattern(self, pattern: FusionPattern) -> FusionPattern:
        """Add a user pattern: graphs compiled from now on try to fuse its ops into one
        kernel (or record why they cannot). Returns the pattern."""
        if not isinstance(pattern, FusionPattern):
            raise TypeError(f"register_pattern takes a FusionPattern, got {type(pattern).__name__}")
        if pattern.name in self.patterns:
            raise ValueError(f"a pattern named {pattern.name!r} is already registered")
        enabled = self._config.enabled_patterns
        self._config = dataclasses.replace(
            self._config, custom_patterns=self._config.custom_patterns + (pattern,),
            enabled_patterns=None if enabled is None else enabled | {pattern.name})
        return pattern

    def effective_config(self) -> FusionConfig:
        if self.enable_fusion:
            return self._config
        return dataclasses.replace(self._config, enable_elementwise=False, enable_reduction=False,
                                   enable_matmul=False)

    # -- compiling ---------------------------------------------------------------------

    def backend(self):
        """A torch.compile backend that compiles with this engine (and records into it).
        torch.compile's `mode`/`options` apply over the engine's config (kitsune.backend)."""
        from kitsune.backend import options_backend
        return options_backend(self.effective_config(), self._compile_graph)

    def fuse(self, target, **compile_kwargs):
        """Fuse `target`:

        - nn.Module or function: returns ``torch.compile(target, backend=<this engine>)``;
          it compiles on its first call (forward, and backward when gradients flow).
        - fx.GraphModule: an aten graph (nodes with ``meta["val"]``, as Dynamo/AOTAutograd
          or ``make_fx`` produce) is compiled right away and the fused GraphModule returned;
          any other GraphModule is compiled like a module.
        - a list of operations: see the module docstring; returns a compiled
          `FusedOperations` module.

        `compile_kwargs` go to torch.compile; its `mode` and `options` apply over the
        engine's config as in kitsune.backend, checked here (ValueError/TypeError).
        """
        from kitsune.backend import apply_compile_options
        config = apply_compile_options(self.effective_config(), compile_kwargs.get("mode"),
                                       compile_kwargs.get("options"))
        if isinstance(target, (list, tuple)):
            module = FusedOperations(target)
            compiled = torch.compile(module, backend=self.backend(), **compile_kwargs)
            return compiled
        if isinstance(target, fx.GraphModule) and _is_aten_graph(target):
            return self._compile_graph(target, [], "graph", config)
        if isinstance(target, nn.Module) or callable(target):
            return torch.compile(target, backend=self.backend(), **compile_kwargs)
        raise TypeError(f"fuse() takes an nn.Module, a function, an fx.GraphModule or a list of operations, "
                        f"got {type(target).__name__}")

    def _compile_graph(self, gm, example_inputs, kind, config):
        from kitsune.compiler import compile_graph
        from kitsune.runtime.fused_call import FusedGroupCall

        tee = TeeStats(self._stats, GLOBAL_STATS)
        compiled = compile_graph(gm, example_inputs, kind, config=config, stats=tee, profile=self.profile)
        record = tee.last
        graph = getattr(compiled, "__wrapped__", compiled)  # kitsune.tuning.measure.measured wraps it
        if record is not None and isinstance(graph, fx.GraphModule):
            for node in graph.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, FusedGroupCall):
                    record.kernel_calls[node.target.spec.name] = node.target
        return compiled

    def detect(self, target, *example_inputs):
        """Fusion opportunities in `target` (an aten graph, or a module/function with example
        inputs, captured but not compiled) for this engine's patterns."""
        from kitsune.fusion.detector import FusionDetector
        return FusionDetector(config=self._config).detect(target, *example_inputs)

    # -- results ---------------------------------------------------------------------

    def get_fusion_stats(self) -> dict:
        """Stats of everything this engine compiled: see kitsune.report.stats for every key.

        num_fused: fused groups running as one generated kernel.
        efficiency: kernels removed / kernels removable, where removable is what
        applying every detected pattern opportunity (and every fused group) would
        remove; 1.0 when nothing is removable. Raise it by acting on the opportunities
        `explain()` lists as not applied.
        measured: with profiling, one dict per timed group (fused_s, unfused_s, speedup, kept, cached).
        """
        stats = self._stats.as_dict()
        stats["profiled"] = self.profile
        return stats

    def reset_stats(self) -> None:
        self._stats.reset()

    @property
    def records(self):
        return self._stats.records()

    def explanation(self, verbose: bool = False) -> str:
        """The text of `explain()` (kept for callers of earlier versions)."""
        return self.explain(verbose=verbose)

    def explain(self, file=None, verbose: bool = False) -> str:
        """What fused into what, what did not and why, patterns fired and estimated
        (or, with profile=True, measured) gains: returned as text, so
        ``print(engine.explain())`` prints it once (an interactive session shows
        it as text too). With `file` (a text stream) it is also written there."""
        from kitsune.report.explain import Explanation, explain_records
        text = Explanation(explain_records(self.records, verbose=verbose, config=self.effective_config()))
        if file is not None:
            print(text, file=file)
        return text

    def report(self, path="kitsune-report.html", title: str | None = None) -> Path:
        """Write one self-contained HTML file (no network needed) with the captured graphs,
        their fusion groups, the generated kernel sources and a before/after time chart."""
        from kitsune.report.html import write_report
        return write_report(self.records, path, title=title, config=self.effective_config())

    def __repr__(self):
        return (f"FusionEngine(enable_fusion={self.enable_fusion}, profile={self.profile}, "
                f"patterns={len(self.patterns)}, graphs={len(self.records)})")
