"""`kitsune.lazy()`: fusion behind the unchanged eager API (spec 05, issue 18).

    with kitsune.lazy():            # or @kitsune.lazy on a function
        y = (x * 2 + 1).sigmoid()   # recorded, not run
        print(y.sum().item())       # sync point: the recorded graph is fused, compiled (or
                                    # taken from the cache) and run; then the value is read

Pointwise ops, casts, views and reductions on CPU/CUDA tensors are recorded
(`kitsune.lazy.region.LazyRegion`, a TorchDispatchMode); everything else is a
sync point that flushes the pending graph first and runs eagerly. See
docs/lazy.md for what syncs, the cache and the limits.
"""
from __future__ import annotations

import functools
import threading

from kitsune.config import FusionConfig

# torch is imported on first use (the region modules), not by `import kitsune`.

__all__ = ["lazy", "sync", "lazy_stats", "reset_lazy_stats", "LazyStats", "LazyTensor"]

DEFAULT_MIN_TENSOR_SIZE = 4096   # elements; below this an op gains nothing from fusion
DEFAULT_MAX_PENDING_OPS = 20000  # a longer recording is flushed (bounds memory held and compile size)

_active = threading.local()


class lazy:  # noqa: N801 - used as `kitsune.lazy()`, like torch.no_grad
    """Record pointwise work in the region and run it fused at sync points.

    `with kitsune.lazy(): ...`, `@kitsune.lazy` or `@kitsune.lazy(min_tensor_size=...)`.
    `min_tensor_size`: ops whose tensors all have fewer elements run eagerly (default:
    `config.min_tensor_size` if set, else 4096). `config`: the FusionConfig the flushed
    graphs are compiled with (CUDA graphs off unless asked for). A region inside an
    active region adds nothing (the outer one records)."""

    def __init__(self, fn=None, *, min_tensor_size: int | None = None, config: FusionConfig | None = None,
                 max_pending_ops: int = DEFAULT_MAX_PENDING_OPS):
        if config is not None and not isinstance(config, FusionConfig):
            raise TypeError(f"kitsune.lazy: config must be a FusionConfig, got {type(config).__name__}")
        if min_tensor_size is None:
            min_tensor_size = (config.min_tensor_size if config is not None else 0) or DEFAULT_MIN_TENSOR_SIZE
        if isinstance(min_tensor_size, bool) or not isinstance(min_tensor_size, int) or min_tensor_size < 0:
            raise ValueError(f"kitsune.lazy: min_tensor_size must be an int >= 0, got {min_tensor_size!r}")
        if isinstance(max_pending_ops, bool) or not isinstance(max_pending_ops, int) or max_pending_ops < 1:
            raise ValueError(f"kitsune.lazy: max_pending_ops must be an int >= 1, got {max_pending_ops!r}")
        if fn is not None and not callable(fn):
            raise TypeError(f"kitsune.lazy: expected a function to decorate, got {type(fn).__name__}")
        self._settings = (min_tensor_size, config, max_pending_ops)
        self._fn = fn
        self._regions: list = []
        if fn is not None:
            functools.update_wrapper(self, fn)

    @staticmethod
    def explain(verbose: bool = False) -> str:
        """`kitsune.lazy.explain()`: what lazy regions recorded, flushed and why they
        synced, then the fusion report of the graphs they compiled (kernels before/after)."""
        from kitsune.report.explain import explain_records
        from kitsune.report.stats import GLOBAL_STATS

        s = lazy_stats()
        reasons = ", ".join(f"{why} {n}" for why, n in sorted(s["sync_reasons"].items(), key=lambda kv: -kv[1]))
        lines = [f"Lazy regions: {s['ops_recorded']} ops recorded, {s['ops_eager']} run eagerly, "
                 f"{s['ops_small']} below min_tensor_size; {s['graphs_flushed']} graphs flushed "
                 f"({s['graphs_compiled']} compiled), cache {s['cache_hits']} hits / {s['cache_misses']} misses",
                 f"Sync points: {reasons or 'none'}"]
        records = [r for r in GLOBAL_STATS.records() if r.name == "lazy"]
        if records:
            lines.append(explain_records(records, verbose=verbose))
        return "\n".join(lines)

    def __call__(self, *args, **kwargs):
        if self._fn is None:  # @kitsune.lazy(min_tensor_size=...)
            fn = args[0]
            return lazy(fn, min_tensor_size=self._settings[0], config=self._settings[1],
                        max_pending_ops=self._settings[2])
        with lazy(min_tensor_size=self._settings[0], config=self._settings[1], max_pending_ops=self._settings[2]):
            return self._fn(*args, **kwargs)

    def __enter__(self):
        if getattr(_active, "region", None) is not None:  # nested: the outer region records
            self._regions.append(None)
            return self
        from kitsune.lazy.region import LazyRegion

        min_tensor_size, config, max_pending_ops = self._settings
        region = LazyRegion(min_tensor_size, config or FusionConfig(cuda_graphs=False), max_pending_ops)
        region.__enter__()
        _active.region = region
        self._regions.append(region)
        return self

    def __exit__(self, exc_type, exc, tb):
        region = self._regions.pop()
        if region is None:
            return False
        _active.region = None
        region.__exit__(exc_type, exc, tb)
        region.finish()  # escaped tensors become real, even when an exception leaves the region
        return False


def sync() -> None:
    """Run what the active lazy region has recorded (no-op outside a region)."""
    region = getattr(_active, "region", None)
    if region is not None:
        region.flush("explicit sync")


def lazy_stats(reset: bool = False) -> dict:
    """Counts over every lazy region of this process: ops_recorded, ops_eager, ops_small,
    graphs_flushed, graphs_compiled, cache_hits, cache_misses, cache_hit_rate and
    sync_reasons (a count per reason). `reset=True` returns them and starts from zero."""
    from kitsune.lazy.region import STATS

    result = STATS.as_dict()
    if reset:
        reset_lazy_stats()
    return result


def reset_lazy_stats(clear_cache: bool = False) -> None:
    """Start the counts from zero (and with `clear_cache`, forget the compiled graphs)."""
    from kitsune.lazy.graph import GRAPH_CACHE, STEPS
    from kitsune.lazy.region import STATS, LazyStats

    STATS.__dict__.update(LazyStats().__dict__)
    if clear_cache:
        GRAPH_CACHE.clear()
        STEPS.clear()  # (states are never reused: a graph recorded from here on gets new ones)


def __getattr__(name):
    if name == "LazyStats":
        from kitsune.lazy.region import LazyStats
        return LazyStats
    if name == "LazyTensor":
        from kitsune.lazy.tensor import LazyTensor
        return LazyTensor
    raise AttributeError(f"module 'kitsune.lazy' has no attribute {name!r}")
