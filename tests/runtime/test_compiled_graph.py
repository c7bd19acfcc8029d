"""The assembled graph (`kitsune.runtime.compiled_graph.build_graph_module`): fused
groups and unfused nodes in an order where every kernel's inputs exist before it runs."""
from __future__ import annotations

import torch

import kitsune


def packed_sequence_mask(positions):
    """transformers' `find_packed_sequence_indices`: a slice whose end is `s0 + 1` is
    folded into a fused group's indexing, so the group reads that size only through
    the view (no member reads the `operator.add` node computing it)."""
    first = positions[:, :1] - 1
    diff = torch.diff(positions, prepend=first, dim=-1)
    return (diff != 1).cumsum(-1)


def test_symbolic_size_read_only_by_a_folded_view_is_computed_before_the_kernel():
    kitsune.reset_fusion_stats()
    compiled = torch.compile(packed_sequence_mask, backend="kitsune", dynamic=True)
    for length in (8, 13):
        positions = torch.arange(length).expand(2, length).clone()
        positions[1, length // 2:] -= 3  # a second packed sequence
        torch.testing.assert_close(compiled(positions), packed_sequence_mask(positions))
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and stats["num_fused"] >= 1, stats["fallbacks"]
