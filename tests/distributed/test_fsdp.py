"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on the CPU (gloo, two processes):
each block and the root sharded, the root compiled with Kitsune. Training matches
the same sharded model uncompiled, in float32 and with FSDP2's bf16 mixed
precision, and every graph Kitsune gets fuses."""
import pytest
import torch
import torch.distributed as dist

import dist_workers


def _fsdp2_missing() -> str | None:
    if not (dist.is_available() and dist.is_gloo_available()):
        return "this torch build has no torch.distributed with the gloo backend"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's saved results (one two-process run shared by the tests below)."""
    return dist_workers.spawn(dist_workers.fsdp_worker, tmp_path_factory.mktemp("fsdp"))


def test_fsdp2_training_matches_uncompiled_fsdp2(ranks):
    dist_workers.assert_training_matches(ranks)  # each rank's shards of the gradients and parameters


def test_fsdp2_ranks_hold_different_shards_of_one_model(ranks):
    first, second = ranks
    assert not torch.equal(first["compiled"]["outputs"][0], second["compiled"]["outputs"][0])
    # the norm's weight (32 floats) is split in two halves of 16, one per rank
    weight = "blocks.0.norm.weight"
    assert first["compiled"]["params"][weight].shape == (dist_workers.FSDP_DIM // 2,)
    assert not torch.equal(first["compiled"]["params"][weight], second["compiled"]["params"][weight])


def test_fsdp2_mixed_precision_training_matches_uncompiled_fsdp2(ranks):
    for rank in ranks:
        compiled, eager = rank["bf16"]["compiled"], rank["bf16"]["eager"]
        assert compiled["outputs"][0].dtype == eager["outputs"][0].dtype == torch.bfloat16
        # bf16 tolerances (rtol of one bf16 rounding, atol of one at 1.0): the first
        # steps agree exactly; the last step's inputs hold parameters that took
        # two bf16-computed updates, one rounding apart here and there
        for step, (out_c, out_e) in enumerate(zip(compiled["outputs"], eager["outputs"])):
            torch.testing.assert_close(out_c, out_e, atol=1e-2, rtol=1.6e-2,
                                       msg=lambda m, step=step: f"step {step} output: {m}")
        torch.testing.assert_close(compiled["losses"], eager["losses"], atol=1e-2, rtol=1.6e-2)
        # float32 gradient shards and parameters (the reduce dtype), from bf16 compute
        torch.testing.assert_close(compiled["grads"], eager["grads"], atol=1e-3, rtol=1.6e-2)
        torch.testing.assert_close(compiled["params"], eager["params"], atol=1e-3, rtol=1.6e-2)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_every_fsdp2_graph_fuses(ranks, precision):
    for rank in ranks:
        records = rank["kitsune"] if precision == "float32" else rank["bf16"]["kitsune"]
        forward = [g for g in records["graphs"] if g[0] == "forward"]
        assert forward and len(records["graphs"]) == 2 * len(forward), records["graphs"]
        for name, groups, fallbacks in records["graphs"]:
            assert groups > 0, records["graphs"]
            assert fallbacks == [], (name, fallbacks)
        assert records["runtime_fallbacks"] == []
