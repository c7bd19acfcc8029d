"""Worker processes for the distributed tests (DDP and FSDP2 on the CPU, gloo).

`spawn(worker, tmp_path)` starts WORLD_SIZE processes with
`torch.multiprocessing.spawn`; they meet through a `FileStore` in `tmp_path`
(no port to pick), train a compiled model and the same model uncompiled on the
same inputs, and each saves what the test compares (`rank<r>.pt`): outputs,
losses, gradients and parameters of both runs, and the Kitsune graph records
of its process. The tests run the comparisons in the parent, so a mismatch
fails with assert_close's message.

This module is imported by the spawned processes by name (pytest puts this
directory on sys.path and spawn hands sys.path to its children), so it holds
everything they need and imports nothing from the test files.
"""
from __future__ import annotations

import copy
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WORLD_SIZE = 2
STEPS = 3
# gloo waits 30 minutes for a lost peer by default; a broken test should fail, not hang CI
TIMEOUT = datetime.timedelta(seconds=120)


class Block(nn.Module):
    """A transformer block's MLP half: LayerNorm, Linear, GELU, Linear, residual."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def assert_training_matches(ranks) -> None:
    """Each rank's outputs, losses, gradients and parameters after the steps equal
    the uncompiled run's (for FSDP2: each rank's shards)."""
    for rank in ranks:
        compiled, eager = rank["compiled"], rank["eager"]
        for step, (out_c, out_e) in enumerate(zip(compiled["outputs"], eager["outputs"])):
            torch.testing.assert_close(out_c, out_e, msg=lambda m, step=step: f"step {step} output: {m}")
        torch.testing.assert_close(compiled["losses"], eager["losses"])
        torch.testing.assert_close(compiled["grads"], eager["grads"])
        torch.testing.assert_close(compiled["params"], eager["params"])


def backward_step(run, model, x):
    """Output, input gradient and parameter gradients of one backward through `run`
    (reentrant checkpointing supports `.backward()`, not `torch.autograd.grad`)."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    out = run(x)
    out.square().sum().backward()
    return out, x.grad, {name: p.grad.clone() for name, p in model.named_parameters()}


class Stack(nn.Module):
    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def spawn(worker, tmp_path: Path) -> list[dict]:
    """Run `worker(rank, world_size, tmp_dir)` in WORLD_SIZE processes; their saved results."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(WORLD_SIZE, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(Path(tmp_path, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD_SIZE)]


def _init(rank: int, world_size: int, tmp: str) -> None:
    # one thread per process: two ranks share the CI machine's two cores
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)


def _local(tensor):
    """A rank's own part of a tensor: an FSDP2 DTensor's shard, a plain tensor itself."""
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.detach().clone()


def train(module, parameters_of: nn.Module, rank: int, dim: int) -> dict:
    """STEPS steps of SGD with momentum on inputs that differ between ranks; what to compare."""
    optimizer = torch.optim.SGD(parameters_of.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1000 + rank)
    outputs, losses = [], []
    for _ in range(STEPS):
        x = torch.randn(2, 8, dim, generator=generator)
        optimizer.zero_grad()
        out = module(x)
        loss = out.square().mean()
        loss.backward()
        optimizer.step()
        outputs.append(out.detach().clone())
        losses.append(loss.detach().clone())
    return {
        "outputs": outputs,
        "losses": losses,
        "grads": {name: _local(p.grad) for name, p in parameters_of.named_parameters()},
        "params": {name: _local(p) for name, p in parameters_of.named_parameters()},
    }


def kitsune_records() -> dict:
    """What Kitsune compiled in this process: one entry per compile_graph call."""
    import kitsune
    from kitsune.report.stats import GLOBAL_STATS

    stats = kitsune.get_fusion_stats()
    return {
        "graphs": [(r.name, len(r.groups), list(r.fallbacks)) for r in GLOBAL_STATS.records()],
        "num_fused": stats["num_fused"],
        "runtime_fallbacks": stats["runtime_fallbacks"],
        # graphs Dynamo captured (before DDPOptimizer splits them for the backend)
        "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }


def _save(result: dict, rank: int, tmp: str) -> None:
    torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


# DDP: bucket_cap_mb=1 is the smallest that Dynamo's DDPOptimizer accepts (it
# asserts that DDP's 1 MiB first bucket is no larger than the others). fc2
# (64x2048 floats, 512 KiB) and fc1 fill the first bucket and the norm starts a
# second one, so DDPOptimizer splits the graph into two pieces.
DDP_DIM, DDP_HIDDEN, DDP_BUCKET_MB = 64, 2048, 1


def ddp_worker(rank: int, world_size: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world_size, tmp)
    try:
        torch.manual_seed(0)
        model = Block(DDP_DIM, DDP_HIDDEN)
        reference = copy.deepcopy(model)
        compiled = torch.compile(DDP(model, bucket_cap_mb=DDP_BUCKET_MB), backend="kitsune")
        eager = DDP(reference, bucket_cap_mb=DDP_BUCKET_MB)
        result = {
            "compiled": train(compiled, model, rank, DDP_DIM),
            "eager": train(eager, reference, rank, DDP_DIM),
            "kitsune": kitsune_records(),
            "optimize_ddp": torch._dynamo.config.optimize_ddp,
        }
        _save(result, rank, tmp)
    finally:
        dist.destroy_process_group()


FSDP_DIM, FSDP_HIDDEN, FSDP_DEPTH = 32, 64, 2


def _sharded_pair(**fully_shard_kwargs):
    """The same model twice, each block and the root sharded with `fully_shard`."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stack(FSDP_DIM, FSDP_HIDDEN, FSDP_DEPTH)
    reference = copy.deepcopy(model)
    for net in (model, reference):
        for block in net.blocks:
            fully_shard(block, **fully_shard_kwargs)
        fully_shard(net, **fully_shard_kwargs)
    return model, reference


def fsdp_worker(rank: int, world_size: int, tmp: str) -> None:
    import kitsune
    from torch.distributed.fsdp import MixedPrecisionPolicy

    _init(rank, world_size, tmp)
    try:
        model, reference = _sharded_pair()
        result = {
            "compiled": train(torch.compile(model, backend="kitsune"), model, rank, FSDP_DIM),
            "eager": train(reference, reference, rank, FSDP_DIM),
            "kitsune": kitsune_records(),
        }
        # FSDP2's mixed precision: bf16 compute on float32 shards, gradients reduced in float32
        kitsune.reset_fusion_stats()
        torch._dynamo.reset()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model, reference = _sharded_pair(mp_policy=policy)
        result["bf16"] = {
            "compiled": train(torch.compile(model, backend="kitsune"), model, rank, FSDP_DIM),
            "eager": train(reference, reference, rank, FSDP_DIM),
            "kitsune": kitsune_records(),
        }
        _save(result, rank, tmp)
    finally:
        dist.destroy_process_group()
