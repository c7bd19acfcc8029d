"""Kitsune: automatic kernel fusion for PyTorch.

    model = torch.compile(model, backend="kitsune")   # or kitsune.optimize(model)
    kitsune.get_fusion_stats()                         # what was fused so far
    with kitsune.lazy(): ...                           # eager code, fused at sync points
"""
from __future__ import annotations

from kitsune import _logging
from kitsune.config import FusionConfig

__version__ = "0.1.0"
__all__ = ["FusionConfig", "optimize", "get_fusion_stats", "reset_fusion_stats", "lazy", "lazy_stats",
           "reset_lazy_stats", "sync", "quantize", "__version__"]

# The "kitsune" logger gets a NullHandler; KITSUNE_LOG=<level> asks for output
# (kitsune._logging: the application's logging configuration wins).
_logging.setup()

# Imported here, not on first use: `kitsune.lazy` must be the function-like class, and
# a later first import of the kitsune.lazy package would rebind the name to the module.
from kitsune.lazy import lazy, lazy_stats, reset_lazy_stats, sync  # noqa: E402
# The same for `kitsune.quantize` (the function; the package imports nothing heavy).
from kitsune.quantize import quantize  # noqa: E402


def optimize(model, config: FusionConfig | None = None, *, mode: str | None = None, options: dict | None = None,
             **compile_kwargs):
    """`torch.compile(model, backend=<kitsune with config>)`: one line to fuse a model or function.

    `mode` and `options` are torch.compile's, read by Kitsune (kitsune.backend): `options`
    sets FusionConfig fields by name over `config`, `mode="max-autotune"` turns on measured
    decisions. They are checked here (ValueError/TypeError naming the mode, option or field),
    and unlike torch.compile both may be given. Other keyword arguments go to torch.compile."""
    import torch

    from kitsune.backend import apply_compile_options, make_backend
    return torch.compile(model, backend=make_backend(apply_compile_options(config, mode, options)),
                         **compile_kwargs)


def get_fusion_stats() -> dict:
    """Counts for everything compiled in this process: num_fused (groups running as one
    generated kernel), kernels_before/kernels_after (eager kernels vs Kitsune's), fallbacks
    (what runs through PyTorch, with the reason), runtime_fallbacks (kernel, reason, calls that
    ran unfused at run time), compile_seconds and the fused groups."""
    from kitsune.report.stats import GLOBAL_STATS
    return GLOBAL_STATS.as_dict()


def reset_fusion_stats() -> None:
    from kitsune.report.stats import GLOBAL_STATS
    GLOBAL_STATS.reset()


def __getattr__(name):
    # `kitsune.nn` and `kitsune.ops` (fused layers and custom ops by hand) on first use:
    # importing them registers torch.library ops, which `import kitsune` need not pay for.
    if name in ("nn", "ops"):
        import importlib
        return importlib.import_module(f"kitsune.{name}")
    raise AttributeError(f"module 'kitsune' has no attribute {name!r}")
