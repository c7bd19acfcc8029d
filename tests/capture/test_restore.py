"""prims.* leftovers of decomposition run as aten ops (kitsune.capture.restore)."""
import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from kitsune.capture.restore import RULES, is_prim, restore_aten, restored_copy

prims, aten = torch.ops.prims, torch.ops.aten


def _prim_graph(prim, inputs, *rest, **kwargs) -> fx.GraphModule:
    """A graph calling `prim(*inputs, *rest, **kwargs)`, with fake `val`s as capture leaves them."""
    graph = fx.Graph()
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in inputs]
    places = []
    for i, fake in enumerate(fakes):
        places.append(graph.placeholder(f"x{i}"))
        places[-1].meta["val"] = fake
    node = graph.call_function(prim, (*places, *rest), kwargs)
    with mode:
        node.meta["val"] = prim(*fakes, *rest, **kwargs)
    graph.output(node)
    return fx.GraphModule(torch.nn.Module(), graph)


def _assert_same_tensor(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def _check(prim, inputs, *rest, **kwargs):
    gm = _prim_graph(prim, inputs, *rest, **kwargs)
    expected = gm(*inputs)
    restored = restored_copy(gm)
    assert restored is not gm and any(map(is_prim, gm.graph.nodes))  # gm itself keeps its prim
    assert not any(map(is_prim, restored.graph.nodes))
    assert all(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"
               for n in restored.graph.nodes if n.op == "call_function"), restored.graph
    got = restored(*inputs)
    _assert_same_tensor(got, expected)
    (out,) = [n for n in restored.graph.nodes if n.op == "output"][0].args
    val = out.meta["val"]  # what later analyses read: the run's shape and strides
    assert tuple(val.shape) == tuple(got.shape) and val.stride() == got.stride() and val.dtype == got.dtype


X = torch.randn(6, 5)
LAYOUTS = {
    "contiguous": X,
    "transposed": X.t(),
    "sliced": torch.randn(6, 10)[:, ::2],
    "empty": torch.randn(0, 5),
    "expanded": torch.randn(1, 5).expand(6, 5),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims", [[1], [0], [0, 1]])
def test_var_and_sum(layout, dims):  # (the prims refuse dims=None)
    x = LAYOUTS[layout]
    for correction in (0.0, 1.0):
        _check(prims.var.default, [x], dims, correction)
    _check(prims.sum.default, [x], dims)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_broadcast_in_dim(layout):
    x = LAYOUTS[layout]
    rows, cols = x.shape
    _check(prims.broadcast_in_dim.default, [x], [rows, 1, cols], [0, 2])
    _check(prims.broadcast_in_dim.default, [x], [3, rows, cols], [1, 2])
    _check(prims.broadcast_in_dim.default, [x], [rows, cols], [0, 1])
    _check(prims.broadcast_in_dim.default, [x[:, :1]], [rows, 7], [0, 1])  # size 1 broadcast


def test_broadcast_of_a_row_reduction_as_layer_norm_keeps_it():
    _check(prims.broadcast_in_dim.default, [torch.randn(8, 16)], [8, 16, 1], [0, 1])
    _check(prims.broadcast_in_dim.default, [torch.tensor(2.0)], [4, 3], [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "empty"])
def test_div(dtype, layout):
    x = (LAYOUTS[layout] * 10).to(dtype)
    y = torch.full_like(x, 3) if dtype.is_floating_point else torch.full_like(x, -3)
    _check(prims.div.default, [x], 64.0 if dtype.is_floating_point else 3)
    _check(prims.div.default, [x, y])
    _check(prims.div.default, [-x, y])  # integers: truncated towards zero, not floored


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_element_type(dtype, layout):
    _check(prims.convert_element_type.default, [LAYOUTS[layout]], dtype)
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    _check(prims.convert_element_type.default, [channels_last], dtype)


def test_a_prim_without_a_rule_calls_its_aten_implementation():
    x = torch.randn(4, 6)
    assert prims.amax.default not in RULES
    gm = _prim_graph(prims.amax.default, [x], [1])
    assert restore_aten(gm) == 1 and not any(map(is_prim, gm.graph.nodes))
    _assert_same_tensor(gm(x), prims.amax(x, [1]))


def test_a_failing_rule_leaves_no_half_rewrite(monkeypatch):
    def broken(emit, a, shape, dims):
        emit.call(aten.unsqueeze.default, (a, 0))
        raise RuntimeError("broken rule")
    monkeypatch.setitem(RULES, prims.broadcast_in_dim.default, broken)
    x = torch.randn(3)
    gm = _prim_graph(prims.broadcast_in_dim.default, [x], [2, 3], [1])
    assert restore_aten(gm) == 1  # the prim's own implementation, called directly
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_function", "output"]
    _assert_same_tensor(gm(x), prims.broadcast_in_dim(x, [2, 3], [1]))


def test_a_graph_without_prims_is_returned_as_it_is():
    gm = fx.symbolic_trace(lambda x: x + 1)
    assert restored_copy(gm) is gm


# -- in the compiler: the graph that runs has no prims, whatever fused ------------------------


def _layer_norm_graph():
    """A captured gelu(layer_norm(x)), and its inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kitsune.capture.dynamo import decomposition_table
    inputs = [torch.randn(8, 64), torch.randn(64), torch.randn(64)]
    gm = make_fx(lambda x, w, b: torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, [64], w, b)),
                 decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)
    assert any(map(is_prim, gm.graph.nodes))  # what capture leaves: prims.var, prims.broadcast_in_dim
    return gm, inputs


def _compile(gm, inputs, **config):
    from kitsune.compiler import compile_graph
    from kitsune.config import FusionConfig
    from kitsune.record import RecordSink
    sink = RecordSink()
    compiled = compile_graph(gm, inputs, "inference", config=FusionConfig(**config), stats=sink)
    (record,) = sink.records()
    return compiled, record


def _prims_run(compiled) -> list:
    return [n for n in compiled.graph.nodes if is_prim(n)]


def test_a_graph_where_nothing_fuses_runs_aten_ops():
    gm, inputs = _layer_norm_graph()
    expected = gm(*inputs)
    compiled, record = _compile(gm, inputs, cpu_fusion=False)
    assert record.groups == [] and _prims_run(compiled) == []
    torch.testing.assert_close(compiled(*inputs), expected)
    assert any(map(is_prim, record.graph.nodes))  # the record keeps the graph as planned


def test_a_fused_groups_unfused_path_runs_aten_ops():
    gm, inputs = _layer_norm_graph()
    expected = gm(*inputs)
    compiled, record = _compile(gm, inputs)
    assert record.kernel_calls and _prims_run(compiled) == []
    for call in record.kernel_calls.values():  # run-time fallback, measured "unfused"
        assert _prims_run(call.fallback) == []
    torch.testing.assert_close(compiled(*inputs), expected)


def test_a_graph_that_falls_back_whole_runs_a_restored_copy(monkeypatch):
    import kitsune.compiler
    gm, inputs = _layer_norm_graph()
    expected = gm(*inputs)
    monkeypatch.setattr(kitsune.compiler, "_compile", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    compiled, record = _compile(gm, inputs)
    assert record.fallbacks == [("inference", "RuntimeError: boom")]
    assert compiled is not gm and _prims_run(compiled) == [] and any(map(is_prim, gm.graph.nodes))
    torch.testing.assert_close(compiled(*inputs), expected)


def test_a_failing_restore_keeps_the_captured_graph(monkeypatch, caplog):
    import kitsune.capture.restore as restore
    gm, _ = _layer_norm_graph()
    monkeypatch.setattr(restore, "restore_aten", lambda gm: (_ for _ in ()).throw(RuntimeError("boom")))
    with caplog.at_level("WARNING", logger="kitsune"):
        assert restored_copy(gm) is gm
    assert "prims.* ops run as captured" in caplog.text


def test_restoring_a_symbolic_graph_adds_no_shape_guard(monkeypatch):
    import torch._dynamo as dynamo

    import kitsune.compiler
    from kitsune.backend import make_backend
    from kitsune.config import FusionConfig
    norm = torch.nn.LayerNorm(16)

    def program(x):
        return torch.softmax(norm(x), -1).var(-1)

    def shape_guards(backend, x):
        dynamo.reset()
        found = []

        def export(guards):
            found.extend(c for g in guards for c in (g.code_list or ()) if "size()" in c or "stride()" in c)
        out = dynamo.optimize(backend, guard_export_fn=export, dynamic=True)(program)(x)
        return sorted(set(found)), out

    restored = []
    monkeypatch.setattr(kitsune.compiler, "restore_aten", lambda gm: restored.append(restore_aten(gm)))
    x = torch.randn(8, 5, 16)
    guards, out = shape_guards(make_backend(FusionConfig(cpu_fusion=False)), x)
    assert sum(restored) > 0  # the graph that runs had prims, now aten ops
    assert guards and guards == shape_guards("aot_eager", x)[0]
    torch.testing.assert_close(out, program(x))
