"""A reduction over a permuted view moves to the view's source only when that removes
the permuted space from the graph (kitsune.capture.simplify)."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.capture.simplify import simplify

aten = torch.ops.aten


def _reduced_sources(f, x):
    """For each sum left after simplify: is it reading a permute?"""
    gm = make_fx(f)(x)
    simplify(gm)
    torch.testing.assert_close(gm(x), f(x))
    return [n.args[0].target is aten.permute.default for n in gm.graph.nodes if n.target is aten.sum.dim_IntList]


def test_a_reduction_alone_on_the_permute_reduces_the_source():
    assert _reduced_sources(lambda x: torch.exp(x).permute(2, 0, 1).sum(0), torch.randn(3, 4, 5)) == [False]


def test_a_norm_that_reads_the_permute_elementwise_reduces_in_the_permuted_space():
    """LayerNorm2d's form: the pointwise part reads the permuted view, so the sums stay
    with it (one frame, one kernel) rather than moving to the source's NCHW space."""
    def norm(x):
        y = x.permute(0, 2, 3, 1)
        centred = y - y.sum(3, keepdim=True) / y.shape[3]
        return (centred / (centred * centred).sum(3, keepdim=True)).permute(0, 3, 1, 2)
    x = torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last)
    assert _reduced_sources(norm, x) == [True, False]  # the first sum reads the permute, the second `centred`
