"""The `torch.compile` entry: `torch.compile(model, backend="kitsune")`.

Registered under the `torch_dynamo_backends` entry point, so it works after
`pip install` without importing kitsune first.
"""
from __future__ import annotations

import functools

from kitsune.capture.dynamo import aot_backend
from kitsune.compiler import compile_graph
from kitsune.config import FusionConfig
from kitsune.report.stats import GLOBAL_STATS


def make_backend(config: FusionConfig | None = None):
    """A Dynamo backend that compiles with `config`."""
    if config is not None and not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, got {type(config).__name__}")
    reductions = config.enable_reduction if config is not None else True
    return aot_backend(functools.partial(_compile_with, config=config), reductions=reductions)


def _compile_with(gm, example_inputs, kind, config):
    return compile_graph(gm, example_inputs, kind, config=config, stats=GLOBAL_STATS)


def kitsune_backend(gm, example_inputs, **kwargs):
    return make_backend()(gm, example_inputs, **kwargs)
