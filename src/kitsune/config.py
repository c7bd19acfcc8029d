"""FusionConfig: every switch of spec 01 (and spec 03's additions), validated
at construction so that a bad value fails where it is written."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class FusionConfig:
    enable_elementwise: bool = True
    enable_reduction: bool = True
    enable_matmul: bool = False
    max_fusion_size: int = 8          # user operations per kernel (layer_norm counts as one)
    min_fusion_benefit: float = 1.1   # keep a measured fusion only if this much faster
    min_tensor_size: int = 0          # elements; smaller groups run through PyTorch
    cpu_fusion: bool = True
    gpu_fusion: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"bool": bool, "int": int, "float": (int, float)}[f.type]
            if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
                raise TypeError(f"FusionConfig.{f.name} must be {f.type}, got {type(value).__name__} {value!r}")
        if self.max_fusion_size < 1:
            raise ValueError(f"FusionConfig.max_fusion_size must be >= 1, got {self.max_fusion_size}")
        if self.min_fusion_benefit < 1.0:
            raise ValueError(f"FusionConfig.min_fusion_benefit must be >= 1.0, got {self.min_fusion_benefit}")
        if self.min_tensor_size < 0:
            raise ValueError(f"FusionConfig.min_tensor_size must be >= 0, got {self.min_tensor_size}")
