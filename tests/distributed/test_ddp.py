"""DistributedDataParallel on the CPU (gloo, two processes): Dynamo's DDPOptimizer
splits the captured graph at bucket boundaries and calls Kitsune once per piece.
The compiled model trains exactly like uncompiled DDP, and every piece fuses."""
import pytest
import torch
import torch.distributed as dist

import dist_workers

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's saved results (one two-process run shared by the tests below)."""
    return dist_workers.spawn(dist_workers.ddp_worker, tmp_path_factory.mktemp("ddp"))


def test_ddp_optimizer_splits_the_graph_and_kitsune_compiles_each_piece(ranks):
    for rank in ranks:
        assert rank["optimize_ddp"] in (True, "ddp_optimizer")
        records = rank["kitsune"]
        # one graph from Dynamo, more than one for Kitsune: the split is DDPOptimizer's
        assert records["dynamo_graphs"] == 1, records
        forward = [g for g in records["graphs"] if g[0] == "forward"]
        backward = [g for g in records["graphs"] if g[0] == "backward"]
        assert len(forward) >= 2, records["graphs"]
        assert len(backward) == len(forward), records["graphs"]


def test_ddp_training_matches_uncompiled_ddp(ranks):
    dist_workers.assert_training_matches(ranks)


def test_ddp_ranks_stay_in_sync(ranks):
    # the ranks saw different inputs: equal parameters mean the compiled pieces'
    # gradients went through DDP's all-reduce
    first, second = ranks
    assert not torch.equal(first["compiled"]["outputs"][0], second["compiled"]["outputs"][0])
    torch.testing.assert_close(first["compiled"]["grads"], second["compiled"]["grads"])
    torch.testing.assert_close(first["compiled"]["params"], second["compiled"]["params"])


def test_every_ddp_piece_fuses(ranks):
    for rank in ranks:
        records = rank["kitsune"]
        assert records["num_fused"] > 0
        for name, groups, fallbacks in records["graphs"]:
            assert groups > 0, records["graphs"]
            assert fallbacks == [], (name, fallbacks)
        assert records["runtime_fallbacks"] == []
