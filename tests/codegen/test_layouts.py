"""Channels-last and other dense permuted layouts: generated kernels walk memory
in its own order (pointwise and reductions), match eager on both backends, and a
norm over the channels of a channels-last tensor (ConvNeXt's LayerNorm2d) is one
kernel."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.capture.dynamo import decomposition_table
from kitsune.capture.simplify import simplify
from kitsune.codegen.lower import lower_group
from kitsune.codegen.schedule import ReductionSchedule, _contiguous_along
from kitsune.config import FusionConfig
from kitsune.ir.index import Index
from kitsune.planner import plan_graph


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    kitsune.reset_fusion_stats()
    return request.param


def _specs(fn, *inputs):
    """The kernel specs Kitsune generates for fn's aten graph (as capture decomposes it)."""
    gm = make_fx(fn, decomposition_table=decomposition_table(True))(*inputs)
    simplify(gm)
    plan = plan_graph(gm, FusionConfig(), "test")
    return [lower_group(group, "kitsune_test")[0] for group in plan.groups]


def _channels_last(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(memory_format=torch.channels_last)


def _element_accesses(spec):
    """Indices of the per-element loads and stores of a kernel (row values left out)."""
    rows = ReductionSchedule.of(spec).row if spec.reduction else frozenset()
    loads = [v.attr[1] for v in spec.values() if v.op == "load" and v not in rows]
    return loads + [o.index for o in spec.outputs if o.value not in rows]


# -- memory order ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: _channels_last(2, 6, 3, 5),
    lambda: torch.randn(3, 5, 2, 6).permute(0, 3, 1, 2),      # channels-last by permute
    lambda: torch.randn(5, 7, 3).permute(2, 0, 1),             # a dense permuted 3-d layout
], ids=["channels_last", "permuted_4d", "permuted_3d"])
def test_pointwise_walks_memory_in_order(make):
    x = make()
    (spec,) = _specs(lambda t: torch.sigmoid(t * 2) + t, x)
    for index in _element_accesses(spec):  # every load and store at x itself: contiguous
        assert index == Index.var(), index


@pytest.mark.parametrize("dims", [(1,), (1, 2, 3), (1, 2), (2, 3), (0, 2, 3)])
def test_channels_last_reductions_read_contiguously(dims):
    """Over C (C innermost), over C, H, W (the row is one contiguous block in the order
    H, W, C), over C and H, over H and W (adjacent rows are adjacent channels): every
    per-element access is contiguous along the row or across rows."""
    x = _channels_last(2, 6, 3, 5)
    (spec,) = _specs(lambda t: (t * 2).sum(dims), x)
    for index in _element_accesses(spec):
        assert _contiguous_along(index, spec.reduction) is not None, (dims, index)
    outer = ReductionSchedule.of(spec).outer
    assert outer == (1 not in dims), dims  # C reduced: along the row; C kept: across rows


def test_a_norm_over_channels_of_a_channels_last_tensor_reads_along_rows():
    x = _channels_last(2, 8, 3, 5)
    (spec,) = _specs(lambda t: F.layer_norm(t.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2), x)
    assert not ReductionSchedule.of(spec).outer
    assert all(_contiguous_along(i, spec.reduction) == "r" for i in _element_accesses(spec))


def test_arg_reductions_keep_the_logical_position():
    """argmax over a whole channels-last tensor returns the logical flat index."""
    x = _channels_last(2, 3, 4, 5)
    x[0, 2, 1, 3] = x[0, 0, 2, 0] = 9.0  # a tie: logical index 10 wins, though 48 comes first in memory
    torch.testing.assert_close(torch.compile(lambda t: (t * 2).argmax(), backend="kitsune")(x), (x * 2).argmax())


# -- results match eager ---------------------------------------------------------------------


class LayerNorm2d(torch.nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _norm_of_view(x):  # F.layer_norm over a channels-last tensor's permuted view, result kept NHWC
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=1e-6) * 2


def _channels_first_norm(x):  # ConvNeXt's own LayerNorm(data_format="channels_first")
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return (x - u) / torch.sqrt(s + 1e-6)


FUNCTIONS = {
    "pointwise": lambda x: F.silu(x * 1.5 + 0.25) * x,
    "sum_c": lambda x: (x * 2).sum(1),
    "mean_hw": lambda x: x.mean((2, 3), keepdim=True) * x,
    "sum_chw": lambda x: (x - 1).sum((1, 2, 3)),
    "amax_ch": lambda x: (x * 2).amax((1, 2)),
    "softmax_c": lambda x: torch.softmax(x, 1),
    "norm_c": _channels_first_norm,
    "layer_norm_of_view": _norm_of_view,
}

LAYOUTS = {
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "contiguous": lambda t: t,
    "sliced": lambda t: torch.cat([t, t], 3)[..., ::2],  # non-contiguous
    "permuted": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).transpose(2, 3)
    .contiguous().transpose(2, 3),  # NCWH-major: another dense permutation
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_eager(backend, layout, dtype):
    """Every function of FUNCTIONS in one graph (one build per case), odd sizes."""
    x = LAYOUTS[layout](torch.randn(2, 5, 3, 7, dtype=dtype))

    def functions(t):
        return tuple(fn(t) for fn in FUNCTIONS.values())
    got = torch.compile(functions, backend="kitsune", dynamic=False)(x)
    for name, g, expected in zip(FUNCTIONS, got, functions(x)):
        torch.testing.assert_close(g, expected, msg=lambda m: f"{name}: {m}")
        assert g.stride() == expected.stride(), name
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and stats["num_fused"] >= len(FUNCTIONS), stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_2d_is_one_kernel(backend, dtype):
    norm = LayerNorm2d(7).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = _channels_last(2, 7, 3, 5, dtype=dtype)
    got = torch.compile(norm, backend="kitsune", dynamic=False)(x)
    torch.testing.assert_close(got, norm(x))
    assert got.stride() == norm(x).stride()
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and len(stats["groups"]) == 1, stats["groups"]


@pytest.mark.parametrize("fn", [LayerNorm2d(6), _norm_of_view], ids=["permute_norm_permute", "norm_of_view"])
def test_channels_last_norm_leaves_nothing_but_views_around_its_kernel(fn, monkeypatch):
    """One kernel, and around it in the graph that runs only views (no prims, no copies)."""
    import kitsune.compiler

    ran = []
    compile_graph = kitsune.compiler._compile
    monkeypatch.setattr(kitsune.compiler, "_compile", lambda *a: ran.append(compile_graph(*a)) or ran[-1])
    x = _channels_last(2, 6, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, backend="kitsune", dynamic=False)(x), fn(x))
    (gm,) = ran
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    kernels = [t for t in calls if getattr(t, "__name__", "").startswith("kitsune_")]
    # (the graph's aten targets may be bound to their faster torch callables: torch.permute)
    others = [t for t in calls if t not in kernels and t is not operator.getitem
              and getattr(t, "__name__", None) != "permute" and t is not torch.ops.aten.permute.default]
    assert len(kernels) == 1 and not others, gm.graph
