"""Kernel names say what a kernel is, in the graph, the stats and the generated source."""
import pytest
import torch

import kitsune
from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
from kitsune.fusion import FusionEngine
from kitsune.ir.index import Index
from kitsune.ir.scalar import load
from kitsune.planner.naming import function_name, kernel_name
from kitsune.runtime.fused_call import FusedGroupCall


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")


def _kernels(engine):
    return [(k, set(nodes)) for rec in engine.records for k, nodes, _ in rec.groups]


@pytest.mark.parametrize("fn,kind", [
    (lambda x: torch.softmax(x * 2, -1), "softmax"),
    (lambda x: torch.log_softmax(x, -1) + 1, "log_softmax"),
    (lambda x: torch.nn.functional.layer_norm(x, (8,)).relu(), "layer_norm"),
    (lambda x: (x * x).sum(-1) + 1, "reduction"),
    (lambda x: torch.sigmoid(x) * x + 1, "pointwise"),
])
def test_kernels_are_named_by_kind(fn, kind):
    engine = FusionEngine()
    x = torch.randn(4, 8)
    torch.testing.assert_close(engine.fuse(fn)(x), fn(x))
    ((name, _),) = _kernels(engine)
    assert name.startswith(f"kitsune_{kind}_") and len(name) == len(f"kitsune_{kind}_") + 8, name
    (record,) = engine.records
    assert list(record.kernel_calls) == [name]
    assert name in engine.explanation()


def test_identical_groups_have_unique_names_and_share_one_function():
    def f(x, y):
        return torch.softmax(x, -1) * 2, torch.softmax(y, -1) * 2

    engine = FusionEngine()
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    compiled = engine.fuse(f)
    torch.testing.assert_close(compiled(x, y), f(x, y))
    names = [k for k, _ in _kernels(engine)]
    assert len(names) == 2 and names[1] == names[0] + "_1", names
    (record,) = engine.records
    calls = list(record.kernel_calls.values())
    assert [c.spec.name for c in calls] == names and all(isinstance(c, FusedGroupCall) for c in calls)
    assert [c.__name__ for c in calls] == names
    assert function_name(calls[0].spec) == function_name(calls[1].spec) == names[0]


def _spec(name: str) -> KernelSpec:
    return KernelSpec(name, 16, (KernelInput("in0", torch.float32),),
                      (KernelOutput("out0", torch.float32, Index.var(), load(0, Index.var(), torch.float32)),))


def test_function_name_drops_the_repeat_suffix_only():
    taken = set()
    spec = _spec("k")
    first, second = kernel_name("softmax", spec, taken), kernel_name("softmax", spec, taken)
    key = spec.structure_key()
    assert (first, second) == (f"kitsune_softmax_{key[:8]}", f"kitsune_softmax_{key[:8]}_1")
    assert function_name(_spec(first)) == function_name(_spec(second)) == first
    assert function_name(spec) == f"kitsune_{key}"  # specs named otherwise (tests, probes)


def test_generated_source_uses_the_kernel_name(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    engine = FusionEngine()
    x = torch.randn(4, 8)
    try:
        engine.fuse(lambda a: torch.softmax(a, -1))(x)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"CPU backend unavailable here: {error}")
    calls = [c for rec in engine.records for c in rec.kernel_calls.values() if c.kernel is not None]
    if not calls:
        pytest.skip("CPU backend built no kernel here (no C compiler?)")
    assert calls[0].spec.name.startswith("kitsune_softmax_")
    assert f"{calls[0].spec.name}(" in calls[0].kernel.source
    kitsune.reset_fusion_stats()
