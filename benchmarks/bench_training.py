"""Training steps: eager vs Inductor vs Kitsune, side by side in one process.

    python3 benchmarks/bench_training.py [--steps 30] [--rounds 7] [--models block,gpt2] [--json out.json]
    python3 benchmarks/bench_training.py --backends eager,kitsune      # Kitsune alone (baseline runs)
    python3 benchmarks/bench_training.py --device cpu --quick          # does it run? (tiny models)

Models:

    block   the issue-3 LayerNorm -> Linear -> GELU -> Linear block (4096 tokens,
            d = 1024, hidden 4096, bf16 weights), loss = MSE against a random target
    gpt2    GPT-2 small from its config (random weights, no dropout, fp32 weights
            under bf16 autocast, batch 4 x 256 tokens), loss = the LM loss

--quick shrinks both (a 32-token block of width 32; a two-layer GPT-2 of width
64 on 2 x 32 tokens) and runs them in float32 without autocast; its numbers
mean nothing.

Method:

* Each model takes optimizer steps (zero_grad(set_to_none=True), forward,
  backward, SGD step, as a training loop does) through every backend: eager,
  `torch.compile(backend="inductor")` and `torch.compile(backend="kitsune")`,
  `dynamic=False`, each on its own deep copy of the same initial weights.
* The first step is timed alone ("first step s": compilation, and for Kitsune
  the CUDA-graph recordings that follow in the warm-up are not in it). Then 5
  warm-up steps; on CUDA the peak memory over these first 6 steps, above what
  was allocated before them (the model, its inputs), is reported per backend:
  CUDA-graph recordings keep their own intermediates.
* Correctness: the first step's loss, and the worst relative L2 error over the
  parameters' gradients after the first step against eager's.
* Time: interleaved rounds (`common.interleaved_rounds`): each round runs
  `--steps` steps of every backend in turn, synchronising before and after;
  a round's figure is wall time / steps; the median over `--rounds` rounds
  is reported, in ms per step. Interleaving makes drift of the host hit all
  backends alike. Speed-up = other time / Kitsune time (> 1: Kitsune faster).

Output: a line per backend while it runs, a markdown table last, and with
`--json PATH` every number (rounds included) and the environment.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402

MODELS = ("block", "gpt2")


def block_model(device, quick: bool):
    from bench_reductions import Block
    torch.manual_seed(0)
    tokens, d, h = (32, 32, 64) if quick else (4096, 1024, 4096)
    dtype = torch.float32 if quick else torch.bfloat16
    model = Block(d, h).to(device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    target = torch.randn_like(x)

    def loss_fn(m):
        return torch.nn.functional.mse_loss(m(x), target)
    return model, loss_fn


def gpt2_model(device, quick: bool):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tiny = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=1000) if quick else {}
    config = transformers.GPT2Config(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, **tiny)
    model = transformers.GPT2LMHeadModel(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (2, 32) if quick else (4, 256), device=device)

    def loss_fn(m):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not quick):
            return m(tokens, labels=tokens).loss
    return model, loss_fn


def make_step(fn, model, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(fn)
        loss.backward()
        opt.step()
        return loss
    return step


def first_steps(name, backend, base, loss_fn, device) -> tuple:
    """(step function, gradients after the first step, result dict) of one backend:
    its first step timed alone, then 5 warm-up steps, peak memory on CUDA."""
    model = copy.deepcopy(base)
    fn = model if backend == "eager" else torch.compile(model, backend=backend, dynamic=False)
    step = make_step(fn, model, loss_fn)
    cuda = device.type == "cuda"
    common.synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = step()
    common.synchronize(device)
    result = dict(first_step_s=time.perf_counter() - start, loss=loss.item())
    grads = [p.grad.detach().double().clone() for p in model.parameters() if p.grad is not None]
    for _ in range(5):  # warm-up (and the CUDA-graph recordings)
        step()
    common.synchronize(device)
    line = f"{name}/{backend}: first step {result['first_step_s']:.1f} s, loss {result['loss']:.5f}"
    if cuda:
        result["peak_mib_above_model"] = (torch.cuda.max_memory_allocated() - held) / 2**20
        line += f", peak memory over its first 6 steps {result['peak_mib_above_model']:.0f} MiB above the model"
    if backend == "kitsune":
        result["report"] = common.kitsune_report()
    print(line)
    return step, grads, result


def cuda_graph_names() -> list[str] | None:
    """Kitsune's graphs that replay as CUDA graphs (None if this kitsune does not say)."""
    try:
        from kitsune.report.stats import GLOBAL_STATS
        return sorted({r.name for r in GLOBAL_STATS.records() if getattr(r, "cuda_graph", False)})
    except (ImportError, AttributeError):
        return None


def run_model(name, builder, device, backends, quick, rounds, steps_per_round) -> dict:
    import kitsune
    base, loss_fn = builder(device, quick)
    kitsune.reset_fusion_stats()
    steps, grads, res = {}, {}, {}
    for backend in backends:
        steps[backend], grads[backend], res[backend] = first_steps(name, backend, base, loss_fn, device)
    if "eager" in grads:
        for backend, g in grads.items():
            if backend != "eager":
                worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(g, grads["eager"]))
                res[backend]["worst_grad_rel_error"] = worst
                print(f"  {backend}: worst relative L2 error of a gradient vs eager {worst:.2e}")
    timings = common.interleaved_rounds(steps, device, rounds, steps_per_round, warmup_calls=0)
    k = timings["kitsune"].median_ms if "kitsune" in timings else None
    for backend, timing in timings.items():
        res[backend]["timing"] = timing.as_dict()
        line = f"  {backend:9s} {timing.median_ms:8.3f} ms/step (min {timing.min_ms:.3f}, max {timing.max_ms:.3f})"
        if k and backend != "kitsune":
            line += f"  kitsune speed-up {timing.median_ms / k:5.2f}x"
        print(line)
    if "kitsune" in steps:
        res["kitsune"]["cuda_graphs"] = cuda_graph_names()
        print("  kitsune graphs replayed as CUDA graphs:", res["kitsune"]["cuda_graphs"])
    return res


def table(results: dict) -> str:
    headers = ["model", "eager ms/step", "inductor ms/step", "kitsune ms/step", "vs eager", "vs inductor",
               "worst grad error inductor / kitsune", "first step s inductor / kitsune"]
    lines = []
    for name, res in results["models"].items():
        ms = {b: res.get(b, {}).get("timing", {}).get("median_ms") for b in common.BACKENDS}
        cells = [name] + [f"{ms[b]:.3f}" if ms[b] else "n/a" for b in common.BACKENDS]
        cells += [common.speedup_cell(ms["eager"], ms["kitsune"]), common.speedup_cell(ms["inductor"], ms["kitsune"])]
        errors = [res.get(b, {}).get("worst_grad_rel_error") for b in ("inductor", "kitsune")]
        cells.append(" / ".join(f"{e:.1e}" if e is not None else "n/a" for e in errors))
        firsts = [res.get(b, {}).get("first_step_s") for b in ("inductor", "kitsune")]
        cells.append(" / ".join(f"{s:.1f}" if s is not None else "n/a" for s in firsts))
        lines.append(cells)
    return common.markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_standard_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 30; quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; quick 3)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    common.check_device(device)
    backends = common.parse_backends(args.backends)
    names = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in names):
        raise SystemExit(f"--models: choose from {','.join(MODELS)}")
    common.disable_compile_caches()
    import kitsune  # noqa: F401  (registers the backend)
    common.ensure_kitsune_backend()
    env = common.environment(device)
    print(env)
    builders = {"block": block_model, "gpt2": gpt2_model}
    results = {"benchmark": "training", "environment": env, "models": {}}
    for name in names:
        results["models"][name] = run_model(name, builders[name], device, backends, args.quick,
                                            args.rounds or (3 if args.quick else 7),
                                            args.steps or (3 if args.quick else 30))
    print()
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}; median of "
          f"interleaved rounds, ms per optimizer step; vs = other / kitsune (> 1: kitsune faster)")
    print()
    print(table(results))
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
