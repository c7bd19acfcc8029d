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
