"""FusionConfig: every switch of spec 01 (and spec 03's additions), validated
at construction so that a bad value fails where it is written."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

_SCALAR_TYPES = {"bool": bool, "int": int, "float": (int, float)}


@dataclass(frozen=True)
class FusionConfig:
    enable_elementwise: bool = True
    enable_reduction: bool = True
    enable_matmul: bool = False
    # User operations per kernel: the distinct operations the user's code called
    # (Dynamo's source_fn_stack; autograd's op in backward graphs), not the aten
    # primitives they decompose into: F.layer_norm is one, an RMSNorm written as
    # pow/mean/add/rsqrt/mul is five; dtype conversions and views count for
    # nothing; a producer recomputed in a consumer kernel counts there too. Two
    # groups that only this limit keeps apart are cut where the fewest bytes cross
    # (kitsune.planner.split), not wherever the limit is reached.
    max_fusion_size: int = 8
    min_fusion_benefit: float = 1.1   # keep a measured fusion only if this much faster
    # Measured decisions: time each fused kernel against its unfused ops on its first
    # real call and keep it only if min_fusion_benefit times faster
    # (kitsune.tuning.measure; also on with a non-default min_fusion_benefit, with
    # FusionEngine(profile=True) and with torch.compile's mode="max-autotune").
    measure: bool = False
    # Seconds of timing per compiled graph for measured decisions (kitsune.tuning.measure):
    # past it, groups without a cached decision keep their fusion unmeasured (counted in
    # the stats' `measure_skipped`). Decisions are cached, so a later run measures the rest.
    measure_budget_s: float = 30.0
    min_tensor_size: int = 0          # elements; smaller groups run through PyTorch
    cpu_fusion: bool = True
    gpu_fusion: bool = True
    # Replay each compiled CUDA graph (inference, forward and backward) as one
    # CUDA graph after two warm-up calls (kitsune.runtime.cuda_graphs): removes
    # the host time of hundreds of launches; inputs, outputs and results stay
    # as in eager. Training recordings keep one step's activations and gradients.
    cuda_graphs: bool = True
    # Named patterns Kitsune may apply (see kitsune.planner.patterns): None = every
    # built-in and custom pattern. Generic pointwise fusion is "elementwise_chain".
    enabled_patterns: frozenset | None = None
    # User FusionPatterns (kitsune.fusion.FusionPattern) that steer grouping.
    custom_patterns: tuple = ()
    # Keep each compiled graph (plan, kernels, launch and measured decisions) in the disk
    # cache and load it in later processes instead of compiling (kitsune.runtime.graph_cache);
    # the environment variable KITSUNE_GRAPH_CACHE=0 turns it off too.
    graph_cache: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _SCALAR_TYPES.get(f.type)
            if expected is None:
                continue
            if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
                raise TypeError(f"FusionConfig.{f.name} must be {f.type}, got {type(value).__name__} {value!r}")
        if self.max_fusion_size < 1:
            raise ValueError(f"FusionConfig.max_fusion_size must be >= 1, got {self.max_fusion_size}")
        if not self.min_fusion_benefit >= 1.0:  # NaN too: it would profile and never decide
            raise ValueError(f"FusionConfig.min_fusion_benefit must be >= 1.0, got {self.min_fusion_benefit}")
        if not self.measure_budget_s >= 0.0:  # NaN too
            raise ValueError(f"FusionConfig.measure_budget_s must be >= 0, got {self.measure_budget_s}")
        if self.min_tensor_size < 0:
            raise ValueError(f"FusionConfig.min_tensor_size must be >= 0, got {self.min_tensor_size}")
        self._check_patterns()
        if self.enable_matmul:
            _warn_matmul()

    def _check_patterns(self) -> None:
        from kitsune.planner.patterns import BUILTIN_NAMES, FusionPattern

        custom = self.custom_patterns
        if isinstance(custom, FusionPattern) or not isinstance(custom, (list, tuple)):
            raise TypeError(f"FusionConfig.custom_patterns must be a list of FusionPattern, got {custom!r}")
        seen = set()
        for i, pattern in enumerate(custom):
            if not isinstance(pattern, FusionPattern):
                raise TypeError(f"FusionConfig.custom_patterns[{i}] must be a FusionPattern, "
                                f"got {type(pattern).__name__}")
            if pattern.name in BUILTIN_NAMES or pattern.name in seen:
                raise ValueError(f"FusionConfig.custom_patterns[{i}]: pattern name {pattern.name!r} is already "
                                 f"{'a built-in pattern' if pattern.name in BUILTIN_NAMES else 'used'}")
            seen.add(pattern.name)
        object.__setattr__(self, "custom_patterns", tuple(custom))

        enabled = self.enabled_patterns
        if enabled is None:
            return
        if isinstance(enabled, str) or not hasattr(enabled, "__iter__"):
            raise TypeError(f"FusionConfig.enabled_patterns must be a collection of pattern names or None, "
                            f"got {type(enabled).__name__} {enabled!r}")
        names = []
        for name in enabled:
            if isinstance(name, FusionPattern):
                name = name.name
            if not isinstance(name, str):
                raise TypeError(f"FusionConfig.enabled_patterns holds {name!r}: pattern names are str")
            names.append(name)
        unknown = sorted(set(names) - BUILTIN_NAMES - seen)
        if unknown:
            raise ValueError(f"FusionConfig.enabled_patterns: unknown pattern name(s) {unknown}; "
                             f"known: {sorted(BUILTIN_NAMES | seen)}")
        object.__setattr__(self, "enabled_patterns", frozenset(names))

    def pattern_enabled(self, name: str) -> bool:
        return self.enabled_patterns is None or name in self.enabled_patterns


_matmul_warned = False


def _warn_matmul() -> None:
    """enable_matmul=True is accepted for spec 01's API, but no matmul kernel is generated yet."""
    global _matmul_warned
    if not _matmul_warned:
        _matmul_warned = True
        warnings.warn("FusionConfig.enable_matmul=True: matmul fusion is not generated yet; the matmuls run "
                      "through PyTorch", UserWarning, stacklevel=4)
