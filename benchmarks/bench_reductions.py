"""Reduction and normalisation benchmark: eager vs Inductor vs Kitsune, in one process.

    python3 benchmarks/bench_reductions.py                  # CUDA: the issue's sizes, bf16
    python3 benchmarks/bench_reductions.py --device cpu     # CPU: 4096x1024 fp32
    python3 benchmarks/bench_reductions.py --cases softmax,rmsnorm --json out.json
    python3 benchmarks/bench_reductions.py --models         # also GPT-2 small / BERT-base (CUDA)
    python3 benchmarks/bench_reductions.py --models gpt2 --backends eager,kitsune
    python3 benchmarks/bench_reductions.py --device cpu --quick --models   # does it run? (tiny shapes)

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

--quick shrinks every case (64x256 rows, a 32-token block, two-layer GPT-2
and BERT of width 64, float32) so the whole benchmark runs on the CPU in a
minute or two; its numbers mean nothing.

Method (helpers of benchmarks/common.py, as in bench_pointwise.py):

* One process, backends side by side: eager, `torch.compile(backend="inductor")`
  and `torch.compile(backend="kitsune")`, `dynamic=False`. Before each compile
  Dynamo is reset and every on-disk cache gets a fresh empty directory, so
  "compile s" is a cold first call; a throwaway compile first pays the
  process's one-time costs (imports, Inductor's compile workers).
* Correctness before timing: row cases element-wise against eager
  (assert_close, 2e-2 in bf16); the block and the models by the relative L2
  error of every output against eager (< 2 % in bf16, 0.01 % in fp32). A wrong
  backend is reported and not timed.
* Row cases and models: median over --repeat calls after a warm-up (CUDA event
  pair per call on the GPU, perf_counter on the CPU). The block (fwd+bwd, with
  autograd's host work) is timed in interleaved rounds (every backend once a
  round, mean of --repeat steps a round, median over --rounds rounds), since
  its wall time is mostly the host's and drifts.
* On the GPU, "GPU busy" is the kernels' own time per call (PyTorch's
  profiler, summed device time of every kernel and copy / calls): it leaves
  out a host too slow to keep the GPU fed, where the wall time is the host's.
* Bandwidth: the fewest bytes any implementation must move (inputs read once,
  outputs written once) over the time, as a share of a device-to-device copy
  (`dst.copy_(src)`, 256 MiB a side, read + write counted) measured in the
  same process. On the GPU the share is taken from GPU busy time.
* Kitsune's fusion report is read after each compile: a case where it fell
  back to PyTorch is marked with a WARNING line.

Output: a line per backend and case while it runs, then a markdown table
(wall ms per backend; on the GPU Kitsune's GPU busy time and its share of
the copy rate; Kitsune's speed-up = other time / Kitsune time, > 1: Kitsune
faster; cold compile seconds). `--json PATH` keeps every number, with the
environment (device, torch, triton, and the kitsune source that ran).
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


def row_cases(device, dtype, big: bool, quick: bool = False):
    rows, cols = (64, 256) if quick else (16384, 4096) if big else (4096, 1024)
    ce_rows, ce_cols = (64, 512) if quick else (8192, 32000) if big else (4096, 1024)
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


def block_case(device, dtype, big: bool, quick: bool = False):
    tokens, d, h = (32, 32, 64) if quick else (4096, 1024, 4096) if big else (512, 256, 1024)
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


def run_case(name, fn, args, device, repeats, backends, whole_model=False, dtype=None):
    """Times every backend of one function; returns {backend: dict}."""
    import kitsune
    results = {}
    eager = fn(*args)
    dtype = dtype or args[0].dtype
    for backend in backends:
        common.cold_start()
        kitsune.reset_fusion_stats()
        compiled = fn if backend == "eager" else torch.compile(fn, backend=backend, dynamic=False)
        seconds, out = common.cold_call(compiled, *args, device=device)
        ok = check(f"{name}/{backend}", out, eager, dtype, whole_model)
        entry = dict(compile_s=round(seconds, 3), correct=ok)
        if backend == "kitsune":
            entry["report"] = common.kitsune_report()
            if entry["report"]["fallbacks"]:
                print(f"  WARNING {name}: Kitsune fell back: {entry['report']['fallbacks']}")
        if ok:
            entry["timing"] = common.time_ms(lambda: compiled(*args), device, repeats).as_dict()
            if device.type == "cuda":
                entry["gpu_busy_ms"] = round(common.gpu_busy_ms(lambda: compiled(*args)), 5)
        results[backend] = entry
    return results


MODEL_NAMES = ("gpt2", "bert")


def model_specs(quick: bool) -> dict:
    """name -> (build the model, token shape, vocabulary). Full size: GPT-2 small
    (8 x 512 tokens) and BERT-base (32 x 128), random weights, no dropout; quick:
    two layers of width 64, a vocabulary of 1000, 2 x 32 tokens."""
    import transformers
    transformers.logging.set_verbosity_error()
    tiny_gpt2 = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=1000) if quick else {}
    tiny_bert = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                     vocab_size=1000) if quick else {}
    return {
        "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, **tiny_gpt2)),
            (2, 32) if quick else (8, 512), 1000 if quick else 50257),
        "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **tiny_bert)),
            (2, 32) if quick else (32, 128), 1000 if quick else 30522),
    }


def models(names, device, dtype, repeats, backends, quick: bool):
    """Whole-model inference (logits of a batch of random tokens) per backend."""
    specs = model_specs(quick)
    out = {}
    for name in names:
        build, shape, vocab = specs[name]
        torch.manual_seed(0)
        model = build().to(device=device, dtype=dtype).eval()
        tokens = torch.randint(0, vocab, shape, device=device)

        def fn(t, model=model):
            with torch.no_grad():
                return model(t).logits
        print(f"{name}: {shape} tokens")
        out[name] = dict(tokens=list(shape), **run_case(name, fn, (tokens,), device, repeats, backends,
                                                        whole_model=True, dtype=dtype))
        _print(name, out[name], None, None)
    return out


def _print(name, res, nbytes, copy):
    k = res.get("kitsune", {}).get("timing", {}).get("median_ms")
    for backend, entry in res.items():
        if not isinstance(entry, dict) or "compile_s" not in entry:
            continue
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


def row_case(name, case, device, dtype, repeat, backends, copy):
    """One row case: its bytes, then every backend checked and timed."""
    fn, fargs, ins, outs = case
    expected = fn(*fargs)
    if ins is None:  # every argument read once, every output written once
        ins, outs = list(fargs), list(expected)
    else:
        outs = [expected] if outs else []
    nbytes = common.min_bytes(ins, outs)
    repeats = repeat or common.default_repeats(device, nbytes)
    print(f"{name}: {tuple(fargs[0].shape)} {dtype}, {nbytes / 1e6:.1f} MB moved at least")
    res = run_case(name, fn, fargs, device, repeats, backends)
    _print(name, res, nbytes, copy)
    return dict(shape=list(fargs[0].shape), min_bytes=nbytes, **res)


def block_fwd_bwd(device, dtype, big, quick, backends, rounds, calls):
    """The block's forward + backward per backend, timed in interleaved rounds."""
    import kitsune
    block, make = block_case(device, dtype, big, quick)
    print(f"block_fwd_bwd: {sum(p.numel() for p in block.parameters())} parameters")
    res, steps = {}, {}
    expected = make(block)()
    for backend in backends:
        common.cold_start()
        kitsune.reset_fusion_stats()
        fn = block if backend == "eager" else torch.compile(block, backend=backend, dynamic=False)
        step = make(fn)
        seconds, out = common.cold_call(step, device=device)
        ok = check(f"block_fwd_bwd/{backend}", out, expected, dtype, whole_model=True)
        entry = dict(compile_s=round(seconds, 3), correct=ok)
        if backend == "kitsune":
            entry["report"] = common.kitsune_report()
        if ok:
            steps[backend] = step
        res[backend] = entry
    # Interleaved rounds: every backend runs once a round, so the host's
    # drift (a noisy VM, a busy neighbour) hits them alike.
    for backend, timing in common.interleaved_rounds(steps, device, rounds, calls).items():
        res[backend]["timing"] = timing.as_dict()
        if device.type == "cuda":
            res[backend]["gpu_busy_ms"] = round(common.gpu_busy_ms(steps[backend]), 5)
    _print("block_fwd_bwd", res, None, None)
    return res


def table(results) -> str:
    """The summary: one row per case and model."""
    cuda = results["environment"]["device"].startswith("cuda")
    copy = results["copy_gb_per_s"]
    headers = ["case", "eager ms", "inductor ms", "kitsune ms"]
    headers += ["kitsune GPU ms", "kitsune GPU % of copy"] if cuda else ["kitsune % of copy"]
    headers += ["vs eager", "vs inductor", "compile s inductor / kitsune"]
    lines = []
    for name, res in {**results["cases"], **results.get("models", {})}.items():
        ms = {b: res.get(b, {}).get("timing", {}).get("median_ms") for b in common.BACKENDS}
        k = res.get("kitsune", {})
        cells = [name + ("*" if k.get("report", {}).get("fallbacks") else "")]
        cells += [f"{ms[b]:.4f}" if ms[b] else "n/a" for b in common.BACKENDS]
        nbytes = res.get("min_bytes")
        seconds = k.get("gpu_busy_ms") if cuda else ms["kitsune"]
        if cuda:
            cells.append(f"{seconds:.4f}" if seconds else "n/a")
        cells.append(f"{100 * common.gb_per_s(nbytes, seconds) / copy:.1f}%" if nbytes and seconds else "n/a")
        cells += [common.speedup_cell(ms["eager"], ms["kitsune"]), common.speedup_cell(ms["inductor"], ms["kitsune"])]
        compiles = [res.get(b, {}).get("compile_s") for b in ("inductor", "kitsune")]
        cells.append(" / ".join(f"{c:.2f}" if c is not None else "n/a" for c in compiles))
        lines.append(cells)
    return common.markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_standard_arguments(parser)
    parser.add_argument("--cases", default="softmax,ln_gelu,rmsnorm,cross_entropy,bias_grad,mse_loss,block_fwd_bwd",
                        help="comma-separated (default: %(default)s)")
    parser.add_argument("--models", nargs="?", const=",".join(MODEL_NAMES), default="",
                        help="also whole-model inference: gpt2,bert (the default when the flag has no value)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the block case")
    args = parser.parse_args()
    device = torch.device(args.device)
    common.check_device(device)
    if device.type == "cpu":
        common.reexec_with_malloc_reuse()
    common.disable_compile_caches()
    logging.getLogger("kitsune").setLevel(logging.WARNING)
    import kitsune  # noqa: F401  (registers the backend)
    common.ensure_kitsune_backend()
    big = device.type == "cuda" and not args.quick
    dtype = torch.bfloat16 if big else torch.float32
    backends = common.parse_backends(args.backends)
    cases = [c for c in args.cases.split(",") if c]
    model_names = [m for m in args.models.split(",") if m]
    unknown = [c for c in cases if c not in (*ROW_CASES, "block_fwd_bwd")] + \
        [m for m in model_names if m not in MODEL_NAMES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}")
    repeat = args.repeat or (3 if args.quick else None)
    env = common.environment(device)
    print(json.dumps(env))
    copy = common.copy_rate(device, 1 << 20 if args.quick else 1 << 28, 3 if args.quick else 20 if big else 5)
    print(f"copy rate {copy['gb_per_s']:.1f} GB/s")
    # a throwaway compile pays one-time process costs (imports, compile workers)
    warm = torch.randn(64, 64, device=device)
    for backend in backends:
        if backend != "eager":
            torch.compile(lambda t: torch.softmax(t, -1) * 2, backend=backend)(warm)

    results = {"benchmark": "reductions", "environment": env, "copy_gb_per_s": copy["gb_per_s"],
               "device": str(device), "dtype": str(dtype), "cases": {}}
    rows = row_cases(device, dtype, big, args.quick)
    for name in cases:
        if name == "block_fwd_bwd":
            results["cases"][name] = block_fwd_bwd(device, dtype, big, args.quick, backends,
                                                   args.rounds or (3 if args.quick else 7 if big else 9),
                                                   repeat or (50 if big else 10))
        else:
            results["cases"][name] = row_case(name, rows[name], device, dtype, repeat, backends, copy["gb_per_s"])
    if model_names:
        results["models"] = models(model_names, device, dtype, repeat or 50, backends, args.quick)
    print()
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}; {dtype}; "
          f"copy {common.format_rate(copy['gb_per_s'])} GB/s; wall ms are medians; vs = other / kitsune "
          f"(> 1: kitsune faster); * = kitsune fell back somewhere")
    print()
    print(table(results))
    common.write_json(args.json, results)


ROW_CASES = ("softmax", "ln_gelu", "rmsnorm", "cross_entropy", "bias_grad", "mse_loss")

if __name__ == "__main__":
    main()
