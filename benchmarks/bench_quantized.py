"""Weight-only quantized matmul (`kitsune.nn.QuantizedLinear`, issue 17 item 4) against bf16 cuBLAS.

    python3 benchmarks/bench_quantized.py --out quant.md                 # CUDA: the layer table
    python3 benchmarks/bench_quantized.py --decode --out quant.md        # + greedy decode of a ~1B Llama
    python3 benchmarks/bench_quantized.py --device cpu --quick --decode --out /tmp/q.md   # does it run?

Layer cases (CUDA: bf16 activations, no bias, asymmetric RTN; the CPU's "bf16" column is float32):
* int4 group 128 at K = N = 4096 and the Llama-8B MLP shapes (N x K = 14336 x 4096 and
  4096 x 14336), M in 1, 2, 4, 8, 16, 64, 256, 1024 rows;
* int2 and int8 (group 128) at M = 1 on the same shapes.
Variants, each checked against `F.linear(x, layer.dequantize(bf16))` before it is timed:
* bf16:       `F.linear(x, W)` with the float weight (cuBLAS) -- the baseline of every ratio;
* kitsune:    `QuantizedLinear(x)` (`kitsune::quantized_linear`: the kernel chosen by
              kitsune.quantize.dispatch, its choice printed);
* eager-deq:  `F.linear(x, dequantize(...))`, dequantised by PyTorch ops at every call;
* inductor-deq: `torch.compile` (Inductor) of that dequantise + matmul.
Timing: on CUDA `triton.testing.do_bench_cudagraph` (median over CUDA-graph replays: the
kernels' own time, without the host's launch overhead, which at M = 1 is larger than the
kernels; `--timer events` uses `triton.testing.do_bench` instead, host included); on the CPU
the median of `time.perf_counter` around calls. Columns: median ms, speed-up over bf16, and
the weight-read bandwidth (bytes of the weight as each variant stores it -- packed codes +
scales + zeros for the quantized ones -- over the time) in GB/s.

`--decode`: a Llama-style model (transformers `LlamaConfig`, random weights; ~1.1 B parameters
on CUDA, a tiny one with --quick) generates greedily at batch 1 with a static KV cache;
tokens per second for bf16 eager, bf16 under Inductor, int4 g128 (`kitsune.quantize`, lm_head
kept) eager and int4 under backend="kitsune"; the compiled ones with `--compile-mode`
(reduce-overhead: CUDA graphs for both). Tokens/s counts the whole second `generate` call
(prefill of a 16-token prompt included; the first call compiles and warms up).

Everything goes to `--out` (markdown: tables, choices, environment) and `--json`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]   # (N = out, K = in)
ROWS = [1, 2, 4, 8, 16, 64, 256, 1024]
QUICK_SHAPES = [(96, 80), (40, 130)]
QUICK_ROWS = [1, 3, 20]
VARIANTS = ("bf16", "kitsune", "eager-deq", "inductor-deq")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_standard_arguments(parser)
    parser.add_argument("--out", metavar="PATH", help="write the log (markdown) here")
    parser.add_argument("--decode", action="store_true", help="also greedy decode of a Llama-style model")
    parser.add_argument("--timer", choices=["cudagraph", "events"], default="cudagraph")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated in --decode (default 128)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode of the compiled decode models, Inductor's and Kitsune's alike "
                             "(default: %(default)s -- CUDA graphs: batch-1 decode is launch-bound without them)")
    return parser.parse_args(argv)


class Log:
    """Prints and keeps every line for --out."""

    def __init__(self):
        self.lines = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


def timer(device: torch.device, kind: str, quick: bool):
    """fn -> median ms, as the module docstring says."""
    if device.type == "cuda":
        import triton.testing

        def cuda_ms(fn):
            if kind == "cudagraph":
                try:
                    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
                except Exception as error:  # noqa: BLE001 - a variant that cannot be captured
                    print(f"  (CUDA graph capture failed: {type(error).__name__}: {error}; events instead)")
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return cuda_ms
    repeats = 3 if quick else 20
    return lambda fn: common.time_ms(fn, device, repeats, warmup_ms=5.0, min_warmup_calls=1).median_ms


def dequant_fn():
    """The PyTorch dequantise + matmul (what eager-deq runs and inductor-deq compiles)."""
    from kitsune.quantize.packing import dequantize

    def run(x, codes, scales, zeros, bits, group, k):
        return F.linear(x, dequantize(codes, scales, zeros, bits, group, k, x.dtype))
    return run


def layer_variants(layer, weight, x, inductor_fn):
    args = (layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.in_features)
    eager = dequant_fn()
    return {"bf16": lambda: F.linear(x, weight), "kitsune": lambda: layer(x),
            "eager-deq": lambda: eager(x, *args), "inductor-deq": lambda: inductor_fn(x, *args)}


def weight_bytes(layer, variant: str, weight) -> int:
    if variant == "bf16":
        return weight.numel() * weight.element_size()
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros) if t is not None)


def run_case(n, k, m, bits, device, dtype, measure, inductor_fn, log) -> dict:
    from kitsune.nn.quantized import QuantizedLinear
    from kitsune.quantize import dispatch
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    layer = QuantizedLinear.from_linear(linear, bits=bits, group_size=128)
    weight = linear.weight.detach()
    x = torch.randn(m, k, device=device, dtype=dtype)
    want = F.linear(x, layer.dequantize(dtype))
    row = {"N": n, "K": k, "M": m, "bits": bits, "ms": {}, "gbps": {}, "errors": {}}
    with torch.no_grad():
        for name, fn in layer_variants(layer, weight, x, inductor_fn).items():
            try:
                out = fn()
                if name != "bf16":
                    error = common.relative_error(out.float(), want.float())
                    row["errors"][name] = error
                    if error > 2e-2:
                        log(f"  {name}: relative error {error:.3g} against the dequantised matmul: not timed")
                        continue
                ms = measure(fn)
            except Exception as error:  # noqa: BLE001 - one variant failing does not stop the table
                log(f"  {name} failed: {type(error).__name__}: {error}")
                continue
            row["ms"][name] = ms
            row["gbps"][name] = weight_bytes(layer, name, weight) / (ms * 1e-3) / 1e9
    key = [k_ for k_ in dispatch.CHOICES if k_[1:4] == (n, k, bits) and
           k_[0] == (m if m <= dispatch.GEMV_MAX_ROWS else 1 << (m - 1).bit_length())]
    if key:
        row["choice"] = dispatch.describe(*dispatch.CHOICES[key[0]])
    else:
        row["choice"] = "PyTorch path" if device.type != "cuda" else "default (not measured)"
    return row


def layer_table(args, device, log) -> list:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes, rows = (QUICK_SHAPES, QUICK_ROWS) if args.quick else (SHAPES, ROWS)
    measure = timer(device, args.timer, args.quick)
    cases = [(n, k, m, 4) for n, k in shapes for m in rows] + [(n, k, 1, b) for n, k in shapes for b in (2, 8)]
    results = []
    for n, k, m, bits in cases:
        # a fresh compile per case: one function over 30 shapes would pass Dynamo's recompile limit
        torch._dynamo.reset()
        inductor_fn = torch.compile(dequant_fn(), dynamic=False) if device.type == "cuda" or not args.quick \
            else dequant_fn()  # --quick on the CPU: no C++ build, the same eager function
        results.append(run_case(n, k, m, bits, device, dtype, measure, inductor_fn, log))
    headers = ["N x K", "M", "bits", "choice"] + [f"{v} ms" for v in VARIANTS] + \
        [f"{v} / bf16" for v in VARIANTS[1:]] + [f"{v} GB/s" for v in VARIANTS]
    table = []
    for r in results:
        ms, base = r["ms"], r["ms"].get("bf16")
        table.append([f"{r['N']}x{r['K']}", str(r["M"]), f"int{r['bits']}", r["choice"]] +
                     [f"{ms[v]:.4f}" if v in ms else "n/a" for v in VARIANTS] +
                     [f"{base / ms[v]:.2f}x" if v in ms and base else "n/a" for v in VARIANTS[1:]] +
                     [common.format_rate(r["gbps"][v]) if v in r["gbps"] else "n/a" for v in VARIANTS])
    log("## Quantized linear (speed-up = bf16 time / variant time)")
    log()
    log(common.markdown_table(headers, table))
    return results


def llama(device, quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    if quick:
        config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    else:  # ~1.1 B parameters (TinyLlama's shape)
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def tokens_per_second(model, prompt, tokens: int, device) -> tuple[float, torch.Tensor]:
    """Greedy generation of `tokens` new tokens (static cache); the second run is timed."""
    from transformers import GenerationConfig
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, cache_implementation="static",
                  pad_token_id=0)
    if hasattr(GenerationConfig(), "disable_compile"):
        kwargs["disable_compile"] = True  # transformers would compile a static-cache model itself: ours decide
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # compiles, warms up
        common.synchronize(device)
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        common.synchronize(device)
    return tokens / (time.perf_counter() - start), out


def decode_table(args, device, log) -> dict:
    import kitsune
    common.ensure_kitsune_backend()
    tokens = 8 if args.quick else args.tokens
    prompt = torch.randint(1, 500, (1, 16), device=device)
    results, outputs = {}, {}
    plans = [("bf16 eager", False, None), ("bf16 inductor", False, "inductor"),
             ("int4 eager", True, None), ("int4 kitsune", True, "kitsune")]
    if args.quick and device.type == "cpu":
        plans = [p for p in plans if p[2] != "inductor"]  # no C++ build in a smoke test
    for name, quantized, backend in plans:
        model = llama(device, args.quick)
        if quantized:
            kitsune.quantize(model, bits=4, group_size=128 if not args.quick else 32, skip=("lm_head",))
        if backend is not None:
            mode = None if device.type == "cpu" else args.compile_mode
            model.forward = torch.compile(model.forward, backend=backend, dynamic=False, mode=mode)
        torch._dynamo.reset()
        try:
            results[name], outputs[name] = tokens_per_second(model, prompt, tokens, device)
        except Exception as error:  # noqa: BLE001 - report and go on
            log(f"  {name} failed: {type(error).__name__}: {error}")
        del model
    log("## Greedy decode, batch 1 (tokens per second)")
    log()
    base = results.get("bf16 inductor") or results.get("bf16 eager")
    rows = [[name, f"{tps:.1f}", f"{tps / base:.2f}x" if base else "n/a"] for name, tps in results.items()]
    log(common.markdown_table(["model", "tokens/s", "vs bf16 inductor (or eager)"], rows))
    same = {name: torch.equal(outputs[name], outputs[ref]) for name, ref in
            (("bf16 inductor", "bf16 eager"), ("int4 kitsune", "int4 eager")) if name in outputs and ref in outputs}
    log(f"\nsame tokens as eager: {same}")
    return {"tokens_per_second": results, "same_tokens": same, "new_tokens": tokens}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    common.check_device(device)
    log = Log()
    env = common.environment(device)
    log(f"# bench_quantized ({env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
        f"timer {args.timer if device.type == 'cuda' else 'perf_counter'})")
    log()
    payload = {"environment": env, "layers": layer_table(args, device, log)}
    if args.decode:
        log()
        payload["decode"] = decode_table(args, device, log)
    from kitsune.quantize import dispatch
    payload["measured_choices"] = {str(k): v for k, v in dispatch.TIMES.items()}
    if args.out:
        Path(args.out).write_text("\n".join(log.lines) + "\n")
        print(f"wrote {args.out}")
    common.write_json(args.json, payload)


if __name__ == "__main__":
    main()
