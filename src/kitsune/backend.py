"""The `torch.compile` entry: `torch.compile(model, backend="kitsune")`.

Registered under the `torch_dynamo_backends` entry point, so it works after
`pip install` without importing kitsune first.

Compile options. `torch.compile` hands a registered backend its `mode` (unless
"default") and `options` as keyword arguments on every graph it compiles
(`torch._TorchCompileWrapper`, the same in torch 2.11 and 2.13). Kitsune reads
them here, on every entry point (the registered backend, `make_backend(config)`
and `kitsune.optimize`):

- `options={...}`: any `FusionConfig` field by name, e.g.
  ``options={"max_fusion_size": 16, "cuda_graphs": False}``. An unknown key
  raises ValueError naming it and listing the fields; a bad value raises the
  error `FusionConfig` raises, naming the field. With `make_backend(config)`
  the options replace those fields of `config`.
- `mode`: "default" and "reduce-overhead" change nothing ("reduce-overhead"
  asks for CUDA graphs, which Kitsune replays by default: `cuda_graphs=True`);
  "max-autotune" turns on measured decisions (`measure=True`: each fused kernel
  is timed against its unfused ops on its first call and kept only if
  `min_fusion_benefit` times faster); "max-autotune-no-cudagraphs" does the
  same with `cuda_graphs=False`. Kitsune has no launch-parameter search: its
  block sizes and warp counts are fixed rules (`kitsune.tuning.launch`), so
  "max-autotune" tunes fuse-or-not decisions only. Any other mode raises
  ValueError listing these.

`torch.compile` itself refuses `mode` and `options` together;
`kitsune.optimize(model, mode=..., options=...)` accepts both (the mode's
settings first, the options over them) and checks them when called, not at the
first call of the model.
"""
from __future__ import annotations

import dataclasses
import functools

from kitsune.capture.dynamo import aot_backend
from kitsune.compiler import compile_graph
from kitsune.config import FusionConfig
from kitsune.report.stats import GLOBAL_STATS

# mode -> the FusionConfig fields it sets (torch._inductor.list_mode_options() names them)
MODES = {
    "default": {},
    "reduce-overhead": {"cuda_graphs": True},
    "max-autotune": {"measure": True},
    "max-autotune-no-cudagraphs": {"measure": True, "cuda_graphs": False},
}


def apply_compile_options(config: FusionConfig | None = None, mode: str | None = None,
                          options: dict | None = None) -> FusionConfig:
    """`config` (default FusionConfig()) with `mode`'s settings and then `options`
    applied: see the module docstring. Raises ValueError for an unknown mode or
    option, and FusionConfig's TypeError/ValueError (naming the field) for a bad value."""
    config = config if config is not None else FusionConfig()
    if not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    mode = "default" if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r} for backend 'kitsune'; valid modes: {', '.join(MODES)}")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"torch.compile options for backend 'kitsune' must be a dict of FusionConfig fields, "
                        f"got {type(options).__name__}")
    valid = [f.name for f in dataclasses.fields(FusionConfig)]
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise ValueError(f"unknown kitsune compile option(s) {', '.join(map(repr, unknown))}; "
                         f"valid options (FusionConfig fields): {', '.join(valid)}")
    changes = {**MODES[mode], **options}
    return dataclasses.replace(config, **changes) if changes else config


def make_backend(config: FusionConfig | None = None):
    """A Dynamo backend that compiles with `config` (and with the `mode`/`options`
    of the `torch.compile` call it is given to, applied over `config`)."""
    if config is not None and not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    return options_backend(config, _compile_with)


def options_backend(config: FusionConfig | None, compile_fn):
    """A Dynamo backend that reads torch.compile's `mode`/`options`, applies them over
    `config` and hands each aten graph to `compile_fn(gm, example_inputs, kind, config=...)`."""
    def backend(gm, example_inputs, mode=None, options=None, **kwargs):
        used = apply_compile_options(config, mode, options)
        compiler = aot_backend(functools.partial(compile_fn, config=used), reductions=used.enable_reduction,
                               lm_head_loss=used.pattern_enabled("softmax_cross_entropy"),
                               attention=used.pattern_enabled("attention"),
                               quantized=used.pattern_enabled("quantized_matmul"))
        return compiler(gm, example_inputs, **kwargs)
    backend.__name__ = "kitsune"
    return backend


def _compile_with(gm, example_inputs, kind, config):
    return compile_graph(gm, example_inputs, kind, config=config, stats=GLOBAL_STATS)


def kitsune_backend(gm, example_inputs, mode=None, options=None, **kwargs):
    """The registered backend: `torch.compile(model, backend="kitsune", mode=..., options={...})`."""
    return make_backend()(gm, example_inputs, mode=mode, options=options, **kwargs)
