"""Graph rewrites before planning (kitsune.capture.simplify)."""
import torch

import kitsune


def test_cat_with_an_empty_cache_becomes_a_fused_copy():
    def f(past, k):
        k = (k * 2).permute(0, 2, 1, 3)
        keys = torch.cat([past, k], dim=-2)  # transformers' DynamicCache, first call
        return keys + 1, keys.sum(-1)

    past = torch.empty(2, 3, 0, 4)
    k = torch.randn(2, 5, 3, 4)
    kitsune.reset_fusion_stats()
    got = torch.compile(f, backend="kitsune")(past, k)
    for g, e in zip(got, f(past, k)):
        torch.testing.assert_close(g, e)
        assert g.stride() == e.stride()
    stats = kitsune.get_fusion_stats()
    fused = [name for group in stats["groups"] for name in group[1]]
    assert any(name.startswith("clone") for name in fused), stats["groups"]
    assert not any(name.startswith("cat") for name in fused)


def test_cat_of_several_tensors_keeps_the_non_empty_ones():
    def f(a, b, c):
        return torch.cat([a, b * 2, c], 0) + 1

    a, b, c = torch.randn(2, 3), torch.empty(0, 3), torch.randn(4, 3)
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(a, b, c), f(a, b, c))


def _aten_graph(f, *args):
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(f)(*args)


def test_permutes_that_cancel_disappear_and_chains_become_one():
    from kitsune.capture.simplify import simplify

    def f(w, x):
        back = w.permute(1, 0).permute(1, 0)            # cancels: w itself
        chain = x.permute(2, 0, 1).permute(0, 2, 1)      # one permute (2, 1, 0)
        return (back @ w).sum(0), chain * 2

    w, x = torch.randn(4, 4), torch.randn(2, 3, 5)
    gm = _aten_graph(f, w, x)
    before = [n for n in gm.graph.nodes if n.target is torch.ops.aten.permute.default]
    assert len(before) == 4
    assert simplify(gm) == 2
    after = [n for n in gm.graph.nodes if n.target is torch.ops.aten.permute.default]
    assert [list(n.args[1]) for n in after] == [[2, 1, 0]]
    for got, want in zip(gm(w, x), f(w, x)):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


def test_a_permute_pair_returned_as_an_output_is_kept_when_it_aliases_an_input():
    """An output that aliases an input keeps the view AOTAutograd traced."""
    from kitsune.capture.simplify import simplify

    gm = _aten_graph(lambda w: w.permute(1, 0).permute(1, 0), torch.randn(3, 4))
    assert simplify(gm) == 0


def test_a_cancelling_permute_pair_returned_as_an_output_is_the_computed_tensor():
    """AOTAutograd returns a weight gradient as permute(permute(mm)): the mm itself."""
    from kitsune.capture.simplify import simplify

    def f(a, b):
        return (a @ b).permute(1, 0).permute(1, 0), (b @ a).permute(1, 0).permute(1, 0) * 2

    a, b = torch.randn(3, 5), torch.randn(5, 3)
    gm = _aten_graph(f, a, b)
    assert simplify(gm) == 2
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.permute.default]
    for got, want in zip(gm(a, b), f(a, b)):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


def test_a_transposing_permute_pair_returned_as_an_output_is_kept():
    from kitsune.capture.simplify import simplify

    gm = _aten_graph(lambda a, b: (a @ b).permute(1, 0).permute(1, 0).permute(1, 0), torch.randn(3, 5),
                     torch.randn(5, 4))
    simplify(gm)
    out = gm(torch.ones(3, 5), torch.ones(5, 4))
    assert out.shape == (4, 3) and out.stride() == (1, 4)


def test_unread_results_are_dropped_but_random_draws_are_kept():
    # A hand-traced graph (make_fx) keeps results nobody reads; a group of them has no
    # output to lower. They are dropped, except a random draw: the one after it must
    # see the generator where eager leaves it.
    from torch.fx.experimental.proxy_tensor import make_fx

    from kitsune.capture.simplify import simplify

    def f(x, y):
        (x * 2).exp()        # never read
        torch.rand_like(x)   # never read, but it advances the generator
        return (x + y).relu() + torch.rand_like(y),

    x, y = torch.randn(8, 8), torch.randn(8, 8)
    gm = make_fx(f)(x, y)
    assert simplify(gm) == 2
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("exp" in t for t in targets) and sum("rand" in t for t in targets) == 2
    torch.manual_seed(0)
    want = f(x, y)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(gm(x, y)[0], want)
