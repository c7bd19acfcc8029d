"""Activation checkpointing (`torch.utils.checkpoint`, both `use_reentrant` modes)
inside a model compiled with Kitsune: forward and gradients equal eager's, the
checkpointed activations are recomputed in the backward graph, and both graphs fuse."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import kitsune
from dist_workers import Block, backward_step as _step
from kitsune.report.stats import GLOBAL_STATS

DIM, HIDDEN = 32, 64


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.blocks = nn.ModuleList([Block(DIM, HIDDEN), Block(DIM, HIDDEN)])
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return x.softmax(-1)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_model_matches_eager_and_fuses(use_reentrant):
    kitsune.reset_fusion_stats()
    torch.manual_seed(0)
    model = Checkpointed(use_reentrant)
    x = torch.randn(4, 8, DIM)
    compiled = _step(torch.compile(model, backend="kitsune"), model, x)
    eager = _step(model, model, x)
    torch.testing.assert_close(compiled, eager)

    records = GLOBAL_STATS.records()
    assert sorted(r.name for r in records) == ["backward", "forward"], [r.name for r in records]
    for record in records:
        assert record.groups, f"{record.name} graph fused nothing"
        assert record.fallbacks == [], record.fallbacks
    assert kitsune.get_fusion_stats()["runtime_fallbacks"] == []
    # The checkpoint's point: fc1's output is not saved but recomputed in the
    # backward, so it holds more matmuls than the two per Linear that gradients need.
    backward = next(r for r in records if r.name == "backward")
    matmuls = sum(n.target is torch.ops.aten.mm.default for n in backward.graph.nodes)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert matmuls > 2 * linears, matmuls
