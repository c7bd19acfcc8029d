"""Training steps on the GPU: eager vs Inductor vs Kitsune, side by side.

    python3 benchmarks/bench_training.py [--steps 50] [--rounds 5] [--models block,gpt2]

Each model takes optimizer steps (SGD, zero_grad(set_to_none=True), as a
training loop does) through every backend, starting from the same weights.
The first steps are checked against eager (loss, and the relative L2 error
of every gradient after the first step), then steps are timed in
interleaved rounds (every backend once per round, so drift on the host hits
them alike); each backend's median over rounds is reported, in ms per step,
wall time with one synchronisation per round. Each backend's peak memory
over its first steps (CUDA-graph recordings included) is printed too.

Models: `block` is the issue-3 LayerNorm→Linear→GELU→Linear block (4096
tokens, d=1024, hidden 4096, bf16); `gpt2` is GPT-2 small from its config
(random weights, no dropout, fp32 weights under bf16 autocast, batch 4 x 256).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def block_model():
    from bench_reductions import Block
    torch.manual_seed(0)
    model = Block(1024, 4096).cuda().to(torch.bfloat16)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    target = torch.randn_like(x)

    def loss_fn(m):
        return torch.nn.functional.mse_loss(m(x), target)
    return model, loss_fn


def gpt2_model():
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).cuda()
    tokens = torch.randint(0, config.vocab_size, (4, 256), device="cuda")

    def loss_fn(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(tokens, labels=tokens).loss
    return model, loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="block,gpt2")
    parser.add_argument("--backends", default="eager,inductor,kitsune")
    args = parser.parse_args()
    common.disable_compile_caches()
    import kitsune  # noqa: F401  (registers the backend)
    print(common.environment(torch.device("cuda")))
    builders = {"block": block_model, "gpt2": gpt2_model}
    for name in args.models.split(","):
        base, loss_fn = builders[name]()
        steps, grads = {}, {}
        for backend in args.backends.split(","):
            model = copy.deepcopy(base)
            fn = model if backend == "eager" else torch.compile(model, backend=backend, dynamic=False)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step(fn=fn, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(fn)
                loss.backward()
                opt.step()
                return loss
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss = step()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            grads[backend] = [p.grad.detach().double().clone() for p in model.parameters() if p.grad is not None]
            for _ in range(5):  # warm-up (and the CUDA-graph recording)
                step()
            steps[backend] = step
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - held) / 2**20
            print(f"{name}/{backend}: first step {compile_s:.1f} s, loss {loss.item():.5f}, "
                  f"peak memory over its first 6 steps {peak:.0f} MiB above the model")
        for backend, g in grads.items():
            if backend == "eager":
                continue
            worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, grads["eager"]))
            print(f"  {backend}: worst relative L2 error of a gradient vs eager {worst:.2e}")
        rounds = {b: [] for b in steps}
        for _ in range(args.rounds):
            for backend, step in steps.items():
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
                rounds[backend].append((time.perf_counter() - t) / args.steps * 1e3)
        k = statistics.median(rounds["kitsune"]) if "kitsune" in rounds else None
        for backend, samples in rounds.items():
            med = statistics.median(samples)
            line = f"  {backend:9s} {med:8.3f} ms/step (rounds {', '.join(f'{s:.3f}' for s in samples)})"
            if k and backend != "kitsune":
                line += f"  kitsune speed-up {med / k:5.2f}x"
            print(line)
        if "kitsune" in steps:
            from kitsune.report.stats import GLOBAL_STATS
            print("  kitsune graphs replayed as CUDA graphs:",
                  sorted({r.name for r in GLOBAL_STATS.records() if r.cuda_graph}))


if __name__ == "__main__":
    main()
