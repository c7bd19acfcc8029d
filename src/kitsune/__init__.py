"""Kitsune: automatic kernel fusion for PyTorch.

    model = torch.compile(model, backend="kitsune")   # or kitsune.optimize(model)
    kitsune.get_fusion_stats()                         # what was fused so far
"""
from __future__ import annotations

import logging
import os

from kitsune.config import FusionConfig

__version__ = "0.1.0"
__all__ = ["FusionConfig", "optimize", "get_fusion_stats", "reset_fusion_stats", "__version__"]

_level = os.environ.get("KITSUNE_LOG", "").upper()
if _level in ("DEBUG", "INFO", "WARNING"):
    # Kitsune's own handler: its messages begin with "kitsune: " themselves (so they
    # say where they come from under any formatter), and the root logger is the user's
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    _logger = logging.getLogger("kitsune")
    _logger.addHandler(_handler)
    _logger.setLevel(_level)
    _logger.propagate = False


def optimize(model, config: FusionConfig | None = None, **compile_kwargs):
    """`torch.compile(model, backend=<kitsune with config>)`: one line to fuse a model or function."""
    import torch

    from kitsune.backend import make_backend
    return torch.compile(model, backend=make_backend(config), **compile_kwargs)


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
