"""The random programs of tests/test_random_graphs.py, run in a lazy region against eager.

Each program (pointwise ops with broadcasting and constants, views, reductions,
softmax, layer norm, var; non-contiguous inputs, NaN/inf, empty tensors) runs
once eagerly and once under `kitsune.lazy(min_tensor_size=0)`; values (with that
module's accuracy rule), dtypes and strides must match. The reference backend
keeps the compile cheap (the lowering and planning are the C backend's)."""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kitsune.lazy import lazy, lazy_stats, reset_lazy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_random_graphs as random_graphs  # noqa: E402


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(program=random_graphs.programs(), seed=st.integers(0, 2 ** 16), specials=st.booleans())
def test_random_program_in_a_lazy_region(monkeypatch, program, seed, specials):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    reset_lazy_stats(clear_cache=True)
    fn = random_graphs.make_fn(program["source"])
    gen = torch.Generator().manual_seed(seed)
    inputs = [random_graphs.make_input(layout, shape, torch.float32, gen, specials)
              for layout, shape in program["inputs"]]
    expected = fn(*inputs)
    reference = fn(*[x.double() for x in inputs])
    with lazy(min_tensor_size=0):
        got = fn(*inputs)
    assert len(got) == len(expected)
    for g, e, r in zip(got, expected, reference):
        assert isinstance(g, torch.Tensor)
        random_graphs.assert_matches(g.detach(), e, r, torch.float32)
        if e.numel() > 1:
            assert random_graphs._significant_strides(g) == random_graphs._significant_strides(e), program["source"]
    stats = lazy_stats()
    if any(kind != "view" for _, _, kind in program["steps"]):  # views of inputs stay eager views
        assert stats["ops_recorded"] >= 1
    assert stats["graphs_compiled"] == stats["graphs_flushed"], "a flushed graph failed to compile or run"


if __name__ == "__main__":
    pytest.main([__file__])
