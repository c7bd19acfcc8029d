"""Groups whose parts iterate over different sizes (issue 14, point 1): a kernel
iterates over what it writes, members of another size are computed where they
are read (broadcast, slice, select), and a producer read at another size by
generated consumers is recomputed in them (`kitsune.planner.recompute`)."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.capture.dynamo import decomposition_table
from kitsune.config import FusionConfig
from kitsune.planner.pointwise import group_outputs, plan_pointwise
from kitsune.report.stats import GLOBAL_STATS

SIZES = "iteration sizes differ"


def _plan(fn, *inputs, **config):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)
    return plan_pointwise(gm.graph, FusionConfig(**config)), gm


def _refusals(plan, text):
    return [d for d in plan.decisions if not d.fused and text in d.reason]


def _compiled(fn, *inputs, **config):
    """fn compiled by Kitsune (generated C), its result checked against eager; the decisions."""
    kitsune.reset_fusion_stats()
    got = kitsune.optimize(fn, FusionConfig(**config))(*inputs)
    torch.testing.assert_close(got, fn(*inputs))
    return [d for record in GLOBAL_STATS.records() for d in record.decisions]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(q, k, positions, inv_freq):
    """Llama's rotary embedding: one cos/sin table per position, read by every head."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotary_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.arange(16), torch.rand(4)


def test_member_larger_than_the_outputs_is_read_through_its_slice():
    # y (8x9) is only read as y[:, 1:] (8x8): one kernel iterating over the 64 outputs
    plan, _ = _plan(lambda x: (x.sin() * 2)[:, 1:].exp(), torch.randn(8, 9))
    (group,) = plan.groups
    assert [n.name for n in group.nodes] == ["sin", "mul", "exp"]
    assert group.numel == 64 and [n.name for n in group_outputs(group)] == ["exp"]
    assert not _refusals(plan, SIZES)


def _slice_consumers(x):
    # y is needed by three consumers of part of it: each computes its part itself
    y = x.sin() * 2
    return y[..., :4].exp() + 1, y[..., 4:].cos(), y[:, 3].tanh(), (x.cos() * 3)[:, 1:].exp()


def test_slice_consumers_recompute_their_producer():
    plan, gm = _plan(_slice_consumers, torch.randn(8, 8))
    assert not _refusals(plan, SIZES)
    assert len(plan.groups) == 4 and plan.replaced
    assert sorted(g.numel for g in plan.groups) == [8, 32, 32, 56]
    assert not [n for n in gm.graph.nodes if n.name == "sin"]  # the producer's own kernel is gone


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_slice_consumers_compute_what_eager_does(backend, monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", backend)
    decisions = _compiled(_slice_consumers, torch.randn(8, 8))
    assert not [d for d in decisions if not d.fused and SIZES in d.reason]
    assert kitsune.get_fusion_stats()["num_fused"] == 4


def test_rotary_embedding_table_is_recomputed_in_each_head_kernel():
    plan, _ = _plan(_rotary, *_rotary_inputs(), max_fusion_size=16)
    assert not _refusals(plan, SIZES)
    # one kernel for q, one for k: the cos/sin table has no kernel of its own
    assert len(plan.groups) == 2
    assert sorted(g.numel for g in plan.groups) == [512, 1024]
    decisions = _compiled(_rotary, *_rotary_inputs(), max_fusion_size=16)
    assert not [d for d in decisions if not d.fused and SIZES in d.reason]


def test_recomputation_respects_max_fusion_size():
    # at the default size the table and a head's ops do not fit one kernel: the table stays
    plan, _ = _plan(_rotary, *_rotary_inputs())
    assert len(plan.groups) == 3
    assert all(len(g.user_ops()) <= 8 for g in plan.groups)


@pytest.mark.parametrize("reader", ["mm", "output"])
def test_producer_something_else_reads_is_not_recomputed(reader):
    # an opaque op (mm) or the graph's output needs the producer's values: it keeps its kernel
    def f(x, w):
        y = x.sin() * 2
        other = y @ w if reader == "mm" else y
        return y[:, :4].exp() + 1, other

    plan, gm = _plan(f, torch.randn(8, 8), torch.randn(8, 8))
    assert not plan.replaced
    assert any({"sin", "mul"} <= {n.name for n in g.nodes} for g in plan.groups)
    assert _refusals(plan, SIZES)
