"""Matmuls with misaligned output rows (kitsune.runtime.matmul)."""
import pytest
import torch
from torch import fx

from kitsune.runtime.matmul import align_matmuls, aligned_addmm, aligned_mm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [101, 64, 7])
def test_aligned_products_match_eager(dtype, n):
    # another layout of the weight may take another BLAS kernel: the sum order,
    # so the last bit, can differ (as it does between cuBLAS kernels)
    a = torch.randn(33, 24).to(dtype)
    w = torch.randn(n, 24).to(dtype)
    bias = torch.randn(n).to(dtype)
    for got, want in [(aligned_mm(a, w.t()), torch.mm(a, w.t())),
                      (aligned_addmm(bias, a, w.t()), torch.addmm(bias, a, w.t())),
                      (aligned_addmm(bias, a, w.t(), beta=0.5, alpha=2), torch.addmm(bias, a, w.t(), beta=0.5, alpha=2))]:
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


def test_only_large_misaligned_cuda_matmuls_are_rewritten():
    gm = fx.symbolic_trace(lambda a, b: torch.ops.aten.mm.default(a, b))
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta["val"] = torch.empty(4096, 50257, dtype=torch.bfloat16, device="meta")
    assert align_matmuls(gm) == 0  # meta/CPU tensors: cuBLAS is not involved


def test_transposed_weight_is_padded_along_its_rows():
    """A Linear's weight arrives as weight.t(): its padded copy keeps that layout
    (contiguous rows copied), and the product is unchanged."""
    from kitsune.runtime.matmul import _padded, aligned_mm
    weight, a = torch.randn(13, 8), torch.randn(5, 8)
    padded = _padded(weight.t())
    assert padded.shape == (8, 16) and padded.stride() == (1, 8)
    torch.testing.assert_close(padded[:, :13], weight.t())
    torch.testing.assert_close(aligned_mm(a, weight.t()), a @ weight.t())


def test_restride_copies_only_the_outputs_in_other_strides():
    from kitsune.runtime.matmul import restride, restrided
    padded = torch.randn(4, 16)[:, :13]          # a padded product's view
    other = torch.randn(3, 3)
    out = restride((padded, other), {0: (13, 1)})
    assert isinstance(out, tuple) and out[0].stride() == (13, 1) and out[1] is other
    torch.testing.assert_close(out[0], padded)
    same = torch.randn(4, 13)
    assert restride([same], {0: (13, 1)})[0] is same  # already in those strides: no copy
    fn = restrided(lambda a: (a[:, :13],), {0: (13, 1)})
    assert fn(torch.randn(4, 16))[0].is_contiguous()


def test_replay_copy_out_uses_the_given_strides():
    from kitsune.runtime.cuda_graphs import _fresh
    padded = torch.randn(4, 16)[:, :13]
    nested = [torch.randn(2).expand(3, 2)]
    out = _fresh((padded, nested), {0: (13, 1)})
    assert out[0].stride() == (13, 1) and out[0].data_ptr() != padded.data_ptr()
    torch.testing.assert_close(out[0], padded)
    torch.testing.assert_close(out[1][0], nested[0])
