"""Groups refused only by `max_fusion_size` (issue 14, point 5): cut where the
fewest bytes cross (`kitsune.planner.split`), not wherever the limit is reached."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.capture.dynamo import decomposition_table
from kitsune.config import FusionConfig
from kitsune.planner.pointwise import plan_pointwise
from kitsune.planner.split import crossing_bytes
from kitsune.report.stats import GLOBAL_STATS

LIMIT = "would hold"


def _plan(fn, *inputs, **config):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)
    return plan_pointwise(gm.graph, FusionConfig(**config))


def _bias_gelu(x, b):
    """GPT-2's MLP glue: a bias add, then tanh-GELU written out (eight operations)."""
    h = x + b
    return 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))


def _inputs():
    torch.manual_seed(0)
    return torch.randn(16, 32), torch.randn(32)


def test_oversized_chain_is_cut_where_one_tensor_crosses():
    plan = _plan(_bias_gelu, *_inputs())
    assert not [d for d in plan.decisions if not d.fused and LIMIT in d.reason]
    (split,) = [d for d in plan.decisions if "split where the least crosses" in d.reason]
    assert "max_fusion_size=8" in split.reason
    # the bias add alone, all of GELU in one kernel: only h crosses, not two of GELU's values
    (gelu,) = plan.groups
    assert gelu.nodes[0].args[0].name == "add" and len(gelu.user_ops()) == 8
    graph = gelu.nodes[0].graph
    result = [n for n in graph.nodes if n.op == "output"][0].args[0]
    assert gelu.nodes[-1] is result  # the last multiply is no longer left to PyTorch
    head = [n for n in graph.nodes if n.name == "add"]
    assert crossing_bytes(head, gelu.nodes) == 2 * 16 * 32 * 4


def test_oversized_chain_computes_what_eager_does():
    kitsune.reset_fusion_stats()
    got = kitsune.optimize(_bias_gelu)(*_inputs())
    torch.testing.assert_close(got, _bias_gelu(*_inputs()))
    decisions = [d for record in GLOBAL_STATS.records() for d in record.decisions]
    assert not [d for d in decisions if not d.fused and LIMIT in d.reason]


def test_parts_respect_the_limit_and_a_larger_limit_needs_no_cut():
    plan = _plan(_bias_gelu, *_inputs(), max_fusion_size=4)
    assert all(len(g.user_ops()) <= 4 for g in plan.groups)
    plan = _plan(_bias_gelu, *_inputs(), max_fusion_size=9)
    assert len(plan.groups) == 1 and not [d for d in plan.decisions if "split" in d.reason]


def test_refusal_for_another_reason_is_not_a_split():
    # a cycle through the matmul, not the size, keeps these apart: no cut is made
    def f(x, w):
        a = x.sin().cos().exp()
        return a * (a @ w).tanh()

    plan = _plan(f, torch.randn(8, 8), torch.randn(8, 8), max_fusion_size=3)
    assert not [d for d in plan.decisions if "split where" in d.reason]
