"""The pattern language (kitsune.planner.match) and the patterns written in it
(kitsune.planner.patterns): built-in and user patterns are the same kind of data,
matched by one engine; node kinds are OpKinds, unit categories OpCategories."""
import json

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.ir.ops import OpKind
from kitsune.planner.match import DequantChain, PointwiseRegion, Shape, Step, UnitPat, match_pattern, opt, seq, unit
from kitsune.planner.patterns import BUILTIN_PATTERNS, FusionPattern, detect, pattern_registry
from kitsune.planner.units import OpCategory, UnitGraph, node_kind

x = torch.randn(4, 8)


def units_of(fn, *inputs):
    return UnitGraph(make_fx(fn, tracing_mode="fake")(*inputs).graph)


def test_every_builtin_is_data_for_the_one_matcher():
    for pattern in BUILTIN_PATTERNS.values():
        assert pattern.builtin and pattern.shapes
        for shape in pattern.match_shapes():
            assert isinstance(shape, Shape)
            assert all(isinstance(s, (Step, PointwiseRegion, DequantChain)) for s in shape.steps)


def test_user_pattern_compiles_to_steps():
    pattern = FusionPattern(name="gate", ops=["mul", "sigmoid", "dropout?", "add"])
    (shape,) = pattern.match_shapes()
    assert [s.pat.op for s in shape.steps] == ["mul", "sigmoid", "dropout", "add"]
    assert [s.optional for s in shape.steps] == [False, False, True, False]
    ug = units_of(lambda a, b: torch.sigmoid(a * b) + a, x, x)
    assert [[u.name for u in m] for m in match_pattern(ug, pattern)] == [["mul", "sigmoid", "add"]]


def test_a_user_pattern_may_be_written_in_the_language():
    # "a tensor-scalar op, then up to two pointwise ops that only read the previous one"
    shape = seq(unit(OpCategory.BINARY), opt(UnitPat(pointwise=True), repeat=2, reads_only_previous=True))
    pattern = FusionPattern(name="scaled", ops=["mul", "elementwise?"], shapes=(shape,))
    ug = units_of(lambda a: (a * 2).exp().cos().sin(), x)
    opps = detect(ug, pattern_registry(extra=[pattern]))
    assert [o.ops for o in opps if o.pattern == "scaled"] == [("mul", "exp", "cos")]
    with pytest.raises(TypeError, match="shapes"):
        FusionPattern(name="bad", ops=["mul"], shapes=("mul",))


def test_anchored_shape_walks_back_through_producers():
    # the softmax's prologue is found from the softmax, only units that feed nothing else
    ug = units_of(lambda a, m: torch.softmax(a * 0.5 + m, -1), x, x)
    (match,) = match_pattern(ug, BUILTIN_PATTERNS["softmax"])
    assert [u.name for u in match] == ["mul", "add", "softmax"]
    ug = units_of(lambda a, m: (s := a * 0.5) + torch.softmax(s + m, -1), x, x)
    (match,) = match_pattern(ug, BUILTIN_PATTERNS["softmax"])
    assert [u.name for u in match] == ["add", "softmax"]  # the mul also feeds the final add


def test_sole_step_with_after_guard():
    # softmax -> log -> nll_loss: the log step applies only after a softmax
    target = torch.randint(0, 8, (4,))
    ug = units_of(lambda a, t: torch.nn.functional.nll_loss(torch.softmax(a, -1).log(), t), x, target)
    assert [[u.name for u in m] for m in match_pattern(ug, BUILTIN_PATTERNS["softmax_cross_entropy"])] == \
        [["softmax", "log", "nll_loss"]]
    ug = units_of(lambda a, t: torch.nn.functional.nll_loss(torch.softmax(a, -1), t), x, target)
    assert match_pattern(ug, BUILTIN_PATTERNS["softmax_cross_entropy"]) == []


def test_registry_rejects_builtin_names():
    with pytest.raises(ValueError, match="built-in"):
        pattern_registry(extra=[FusionPattern(name="softmax", ops=["softmax"])])


def test_one_vocabulary_of_kinds_and_categories():
    ug = units_of(lambda a, w: torch.relu(a @ w).sum(), x, torch.randn(8, 8))
    kinds = {n.name: node_kind(n) for n in ug.graph.nodes if n.op == "call_function"}
    assert kinds == {"mm": OpKind.MATMUL, "relu": OpKind.POINTWISE, "sum_1": OpKind.REDUCTION}
    assert [u.category for u in ug.units] == [OpCategory.MATMUL, OpCategory.ACTIVATION, OpCategory.REDUCTION]
    # str-Enums: JSON and f-strings show the plain value
    assert json.dumps([OpCategory.MATMUL, OpKind.VIEW]) == '["matmul", "view"]'
    assert f"{OpCategory.ACTIVATION.value}" == "activation" and OpCategory.NORM == "norm"


@pytest.mark.parametrize("module", ["units", "cost", "vocabulary", "match", "patterns"])
def test_planner_modules_import_nothing_from_the_layers_above(module):
    import ast
    import importlib

    path = importlib.import_module(f"kitsune.planner.{module}").__file__
    tree = ast.parse(open(path).read())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("kitsune.fusion", "kitsune.report"))]
