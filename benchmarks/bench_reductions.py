"""Reduction and normalisation benchmark: eager vs Inductor vs Kitsune, in one process.

    python3 benchmarks/bench_reductions.py                  # CUDA: the issue's sizes, bf16
    python3 benchmarks/bench_reductions.py --device cpu     # CPU: 4096x1024 fp32
    python3 benchmarks/bench_reductions.py --cases softmax,rmsnorm --json out.json
    python3 benchmarks/bench_reductions.py --models         # also GPT-2 small / BERT-base (CUDA)

Cases (rows x cols; bf16 on CUDA, fp32 on the CPU):

    softmax        softmax(x * 0.125, -1)                         16384x4096   (CPU 4096x1024)
    ln_gelu        gelu(layer_norm(x, w, b))                       16384x4096
    rmsnorm        (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype) * w
    cross_entropy  F.cross_entropy(logits, target)                 8192x32000   (CPU 4096x1024)
    bias_grad      d = gelu_backward(g, x); (d, d.sum(0))          16384x4096   (a column reduction)
    mse_loss       F.mse_loss(x, y): one value from every element      16384x4096   (a whole-tensor reduction)
    block_fwd_bwd  LayerNorm -> Linear -> GELU -> Linear, forward + backward
                   (4096 tokens x 1024 features, 4096 hidden; CPU 512 x 256, 1024)
    gpt2 / bert    whole-model inference, GPT-2 small (8 x 512 tokens) and BERT-base
                   (32 x 128), random weights from transformers configs (--models)

Method: the helpers of benchmarks/common.py, as in bench_pointwise.py. Each
backend is checked against eager (float64 reference for the row cases) before
it is timed; times are medians over --repeat calls after a warm-up (CUDA events
on the GPU, perf_counter on the CPU); on the GPU "GPU busy" is the kernels'
own time per call (profiler), which leaves out a host too slow to keep the
GPU fed (then the wall time is the host's); "share" is the bandwidth of the fewest
bytes any implementation must move (inputs read once, outputs written once)
as a share of the measured device-to-device copy rate. Kitsune's fusion report
is read after each compile: a case where it fell back to PyTorch is marked.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.use_private_caches()
warnings.filterwarnings("ignore", message=".*dynamo_pgo force disabled.*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def softmax(x):
    return torch.softmax(x * 0.125, -1)


def ln_gelu(x, w, b):
    return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b))


def rmsnorm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def bias_grad(g, x):
    """GELU's backward and the bias gradient of the Linear before it: a column
    (outer) reduction over the tokens, written next to the full gradient."""
    d = torch.ops.aten.gelu_backward(g, x)
    return d, d.sum(0)


def row_cases(device, dtype, big: bool):
    rows, cols = (16384, 4096) if big else (4096, 1024)
    ce_rows, ce_cols = (8192, 32000) if big else (4096, 1024)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    x = rand(rows, cols)
    w, b = rand(cols), rand(cols)
    logits = rand(ce_rows, ce_cols)
    target = torch.randint(0, ce_cols, (ce_rows,), generator=g).to(device)
    return {
        "softmax": (softmax, (x,), [x], [x]),
        "ln_gelu": (ln_gelu, (x, w, b), [x, w, b], [x]),
        "rmsnorm": (rmsnorm, (x, w), [x, w], [x]),
        # the loss reads the logits once (plus the targets) and writes a scalar
        "cross_entropy": (cross_entropy, (logits, target), [logits, target], []),
        # reads the gradient and the activation once, writes the gradient and one row
        "bias_grad": (bias_grad, (x, rand(rows, cols)), None, None),
        # a whole-tensor reduction (one row of every element): reads both tensors once
        "mse_loss": (F.mse_loss, (x, w_full := rand(rows, cols)), [x, w_full], []),
    }


class Block(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))


def block_case(device, dtype, big: bool):
    tokens, d, h = (4096, 1024, 4096) if big else (512, 256, 1024)
    torch.manual_seed(0)
    block = Block(d, h).to(device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)

    def make(fn):
        def step():
            for p in block.parameters():
                p.grad = None
            x.grad = None
            out = fn(x)
            out.backward(grad)
            return [out.detach(), x.grad] + [p.grad for p in block.parameters()]
        return step
    return block, make


def check(name, got, expected, dtype, whole_model=False):
    """Element-wise closeness for the row cases; for blocks and models (many
    bf16 roundings, which any compiler reorders) the relative L2 error of each
    output against eager must stay under 2 % (0.01 % in fp32)."""
    low = dtype in (torch.bfloat16, torch.float16)
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-4, atol=1e-4)
    pairs = zip(got if isinstance(got, (list, tuple)) else [got],
                expected if isinstance(expected, (list, tuple)) else [expected])
    try:
        for g, e in pairs:
            if whole_model:
                error = ((g.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
                assert error < (2e-2 if low else 1e-4), f"relative L2 error {error:.2e}"
            else:
                torch.testing.assert_close(g.float(), e.float(), equal_nan=True, **tol)
    except AssertionError as error:
        print(f"  {name}: WRONG RESULT: {str(error).splitlines()[0]}")
        return False
    return True


def kitsune_report():
    import kitsune
    stats = kitsune.get_fusion_stats()
    return dict(kernels_before=stats.get("kernels_before"), kernels_after=stats.get("kernels_after"),
                fallbacks=stats.get("fallbacks"))


def run_case(name, fn, args, device, repeats, backends, whole_model=False):
    """Times every backend of one function; returns {backend: dict}."""
    import kitsune
    results = {}
    eager = fn(*args)
    for backend in backends:
        common.cold_start()
        kitsune.reset_fusion_stats()
        compiled = fn if backend == "eager" else torch.compile(fn, backend=backend, dynamic=False)
        seconds, out = common.cold_call(compiled, *args, device=device)
        ok = check(f"{name}/{backend}", out, eager, torch.bfloat16 if whole_model else args[0].dtype, whole_model)
        entry = dict(compile_s=round(seconds, 3), correct=ok)
        if backend == "kitsune":
            entry["report"] = kitsune_report()
            if entry["report"]["fallbacks"]:
                print(f"  WARNING {name}: Kitsune fell back: {entry['report']['fallbacks']}")
        if ok:
            entry["timing"] = common.time_ms(lambda: compiled(*args), device, repeats).as_dict()
            if device.type == "cuda":
                entry["gpu_busy_ms"] = round(common.gpu_busy_ms(lambda: compiled(*args)), 5)
        results[backend] = entry
    return results


def models(device, repeats, backends):
    import transformers
    transformers.logging.set_verbosity_error()
    out = {}
    specs = {
        "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)), (8, 512), 50257),
        "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), (32, 128), 30522),
    }
    for name, (build, shape, vocab) in specs.items():
        torch.manual_seed(0)
        model = build().to(device=device, dtype=torch.bfloat16).eval()
        tokens = torch.randint(0, vocab, shape, device=device)

        def fn(t, model=model):
            with torch.no_grad():
                return model(t).logits
        print(f"{name}: {shape}")
        out[name] = run_case(name, fn, (tokens,), device, repeats, backends, whole_model=True)
        _print(name, out[name], None, None)
    return out


def _print(name, res, nbytes, copy):
    k = res.get("kitsune", {}).get("timing", {}).get("median_ms")
    for backend, entry in res.items():
        t = entry.get("timing", {}).get("median_ms")
        line = f"  {backend:9s} compile {entry['compile_s']:7.3f} s"
        if t is not None:
            line += f"  {t:9.4f} ms"
            if nbytes:
                rate = common.gb_per_s(nbytes, t)
                line += f"  {rate:8.1f} GB/s"
                if copy:
                    line += f"  {100 * rate / copy:5.1f}% of copy"
            if k and backend != "kitsune":
                line += f"  kitsune speed-up {t / k:5.2f}x"
            busy = entry.get("gpu_busy_ms")
            if busy is not None:
                line += f"  | GPU busy {busy:8.4f} ms"
                if nbytes and copy:
                    line += f" ({100 * common.gb_per_s(nbytes, busy) / copy:5.1f}% of copy)"
        else:
            line += "  (not timed: wrong result)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="softmax,ln_gelu,rmsnorm,cross_entropy,bias_grad,mse_loss,block_fwd_bwd")
    parser.add_argument("--backends", default="eager,inductor,kitsune")
    parser.add_argument("--models", action="store_true", help="also GPT-2 small and BERT-base inference")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the block case")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        common.reexec_with_malloc_reuse()
    common.disable_compile_caches()
    logging.getLogger("kitsune").setLevel(logging.WARNING)
    import kitsune  # noqa: F401  (registers the backend)
    big = device.type == "cuda"
    dtype = torch.bfloat16 if big else torch.float32
    backends = args.backends.split(",")
    cases = args.cases.split(",")
    print(json.dumps(common.environment(device)))
    copy = common.copy_rate(device, 1 << 28, 20 if big else 5)["gb_per_s"]
    print(f"copy rate {copy:.1f} GB/s")
    # a throwaway compile pays one-time process costs (imports, compile workers)
    warm = torch.randn(64, 64, device=device)
    for backend in backends[1:]:
        torch.compile(lambda t: torch.softmax(t, -1) * 2, backend=backend)(warm)

    results = {"copy_gb_per_s": copy, "device": str(device), "dtype": str(dtype), "cases": {}}
    rows = row_cases(device, dtype, big)
    for name in cases:
        if name in rows:
            fn, fargs, ins, outs = rows[name]
            expected = fn(*fargs)
            if ins is None:  # every argument read once, every output written once
                ins, outs = list(fargs), list(expected)
            else:
                outs = [expected] if outs else []
            nbytes = common.min_bytes(ins, outs)
            repeats = args.repeat or common.default_repeats(device, nbytes)
            print(f"{name}: {tuple(fargs[0].shape)} {dtype}, {nbytes / 1e6:.1f} MB moved at least")
            res = run_case(name, fn, fargs, device, repeats, backends)
            _print(name, res, nbytes, copy)
            results["cases"][name] = dict(min_bytes=nbytes, **res)
        elif name == "block_fwd_bwd":
            block, make = block_case(device, dtype, big)
            print(f"{name}: {sum(p.numel() for p in block.parameters())} parameters")
            res, steps = {}, {}
            expected = make(block)()
            for backend in backends:
                common.cold_start()
                kitsune.reset_fusion_stats()
                fn = block if backend == "eager" else torch.compile(block, backend=backend, dynamic=False)
                step = make(fn)
                seconds, out = common.cold_call(step, device=device)
                ok = check(f"{name}/{backend}", out, expected, dtype, whole_model=True)
                entry = dict(compile_s=round(seconds, 3), correct=ok)
                if backend == "kitsune":
                    entry["report"] = kitsune_report()
                if ok:
                    steps[backend] = step
                res[backend] = entry
            # Interleaved rounds: every backend runs once a round, so the host's
            # drift (a noisy VM, a busy neighbour) hits them alike.
            rounds = common.interleaved_rounds(steps, device, args.rounds or (7 if big else 9),
                                               args.repeat or (50 if big else 10))
            for backend, timing in rounds.items():
                res[backend]["timing"] = timing.as_dict()
                if device.type == "cuda":
                    res[backend]["gpu_busy_ms"] = round(common.gpu_busy_ms(steps[backend]), 5)
            _print(name, res, None, None)
            results["cases"][name] = res
        else:
            raise SystemExit(f"unknown case {name!r}")
    if args.models:
        results["models"] = models(device, args.repeat or 50, backends)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
