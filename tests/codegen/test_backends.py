"""The planner's questions to the backends: which one serves a device, what
each refuses, and building kernels."""
import pytest
import torch

from kitsune.codegen.backends import BACKENDS, backend_for, get_backend
from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
from kitsune.ir.index import Index
from kitsune.ir.scalar import load, reduce
from kitsune.tuning.launch import override_launch_choices


def _variance(rows: int, R: int) -> KernelSpec:
    """Each row's variance: two stages (the mean first), so it cannot be split."""
    x = load(0, Index.var(), torch.float32)
    mean = reduce("sum", x) * (1.0 / R)
    d = x - mean
    var = reduce("sum", d * d) * (1.0 / R)
    return KernelSpec("k", rows * R, (KernelInput("in0", torch.float32),),
                      (KernelOutput("out0", torch.float32, Index.var().floordiv(R), var),), reduction=R)


def _sum(rows: int, R: int) -> KernelSpec:
    x = load(0, Index.var(), torch.float32)
    return KernelSpec("k", rows * R, (KernelInput("in0", torch.float32),),
                      (KernelOutput("out0", torch.float32, Index.var().floordiv(R), reduce("sum", x)),),
                      reduction=R)


def test_triton_refuses_few_long_rows_of_a_multi_stage_reduction():
    reason = BACKENDS["triton"].refusal(_variance(1, 1 << 17))
    assert reason is not None and "cannot be split" in reason
    assert BACKENDS["cpu"].refusal(_variance(1, 1 << 17)) is None
    assert BACKENDS["reference"].refusal(_variance(1, 1 << 17)) is None


def test_triton_accepts_what_it_can_split_or_what_is_small_or_has_rows():
    triton = get_backend("triton")
    assert triton.refusal(_sum(1, 1 << 17)) is None        # one stage: split between programs
    assert triton.refusal(_variance(1, 1024)) is None      # small
    assert triton.refusal(_variance(64, 1 << 12)) is None  # enough rows


def test_the_refusal_follows_the_launch_choices():
    spec = _variance(2, 1 << 17)
    assert get_backend("triton").refusal(spec) is not None
    with override_launch_choices(few_rows=2):
        assert get_backend("triton").refusal(spec) is None


def test_backend_for_honours_kitsune_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("KITSUNE_BACKEND", raising=False)
    assert backend_for(cpu).name == "cpu" and backend_for(cuda).name == "triton"
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    assert backend_for(cpu).name == "triton"
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    assert backend_for(cpu).name == "reference" and backend_for(cuda).name == "reference"


def test_an_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="tpu"):
        get_backend("tpu")


@pytest.mark.parametrize("name", ["cpu", "triton", "reference"])
def test_build_returns_a_kernel_per_spec(name):
    spec = _sum(8, 32)
    (kernel,) = get_backend(name).build([spec])
    assert not isinstance(kernel, Exception), kernel
    x = torch.randn(8, 32)
    out = torch.empty(8)
    kernel([x], [out])
    torch.testing.assert_close(out, x.sum(1))


def test_build_reports_a_failure_per_spec():
    bad = KernelSpec("k", 4, (), (KernelOutput("out0", torch.float32, Index.var(),
                                               load(0, Index.var(), torch.int64)),))
    good = _sum(8, 32)
    results = get_backend("triton").build([bad, good])
    assert isinstance(results[0], Exception) and not isinstance(results[1], Exception)
