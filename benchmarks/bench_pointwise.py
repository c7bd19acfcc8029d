"""Pointwise fusion benchmark: eager PyTorch vs Inductor vs Kitsune, in one process.

    python3 benchmarks/bench_pointwise.py                        # CUDA, 64M elements
    python3 benchmarks/bench_pointwise.py --device cpu           # CPU, 16M elements
    python3 benchmarks/bench_pointwise.py --device cpu --quick   # does it run? (64K elements, 5 calls)
    python3 benchmarks/bench_pointwise.py --cases add_relu --dtypes bf16 --json out.json
    python3 benchmarks/bench_pointwise.py --backends eager,kitsune   # Kitsune alone (baseline runs)

Cases (1-D tensors of `numel` random normal elements):

    add_relu    relu(x + y)
    mul_relu    relu(x * 1.7)
    chain       gelu((x * 1.7 + y) * sigmoid(x)) - 0.5

Method (helpers in benchmarks/common.py):

* Each case and dtype runs eager, then `torch.compile(fn, backend="inductor")`,
  then `torch.compile(fn, backend="kitsune")`. Before each compile, Dynamo is
  reset and Inductor's, Triton's and Kitsune's caches get fresh empty
  directories (the process starts with a private temporary cache root; the FX
  graph, AOTAutograd and autotune caches are switched off), so "compile s" is
  a cold first call: tracing, code generation, kernel build and one run.
  One-time process costs (importing Inductor, starting its compile workers,
  importing Kitsune's code generators) are paid by a throwaway compile of an
  unrelated function before the first case, so the first case is not charged
  for them.
* Correctness before timing: each compiled output, on the inputs of the cold
  call and on freshly drawn inputs, must match eager within
  torch.testing.assert_close tolerances (looser for bf16), or else lie within
  two ulps of a float64 evaluation (Inductor keeps bf16 intermediates in
  float32 where eager rounds every op, so it can differ from eager by being
  more accurate). A wrong result marks the backend FAIL and it is not timed.
  Every backend's relative error to float64 is printed and kept in the JSON.
* Time: median over `--repeat` calls after a warm-up, with a CUDA event pair
  per call on CUDA and time.perf_counter on the CPU (the iqr printed per case
  is the spread). Inputs are not rotated: at the default sizes every call
  moves far more bytes than the L2 cache (50 MB on an H100) holds; the script
  prints a note when a run's tensors fit in the last-level cache.
* On the CPU every call allocates its output, and glibc hands blocks over
  32 MiB back to the OS on free, so each call would page-fault its output in
  anew, which at 16M elements costs more than the kernel. The script therefore
  restarts itself once with MALLOC_MMAP_MAX_=0 and a huge
  MALLOC_TRIM_THRESHOLD_, so freed memory is reused, as the CUDA caching
  allocator reuses device memory; `--fresh-pages` keeps glibc's default.
* Bandwidth: the fewest bytes any implementation must move (inputs read once,
  outputs written once) over the median time, and its share of a measured
  device-to-device copy (`dst.copy_(src)`, read + write bytes, at least
  256 MiB a side) timed the same way, before and after the cases (the better
  of the two is the ceiling; their difference shows the drift). Speed-up
  columns are other_time / kitsune_time (> 1: Kitsune faster).
* Kitsune's own report (`kitsune.get_fusion_stats()`) is read after each
  compile, and its warnings are captured while it runs: a case where Kitsune
  fused nothing or fell back to PyTorch gets a loud WARNING line, so a "fast"
  number that is really eager PyTorch cannot go unnoticed.

Output: the markdown table printed last (median ms per backend, Kitsune's
speed-up over each, GB/s with its share of the copy rate, cold compile
seconds) and, with `--json PATH`, every number above per case, backend and
dtype, with the environment (device, torch, triton, kitsune source).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

import common

if "--fresh-pages" not in sys.argv:
    common.reexec_with_malloc_reuse()  # restarts this script once, with glibc told to reuse freed memory
common.use_private_caches()  # before kitsune is imported: KITSUNE_CACHE_DIR and friends

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kitsune  # noqa: E402

BACKENDS = common.BACKENDS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_NUMEL = {"cuda": 64 << 20, "cpu": 16 << 20}
QUICK_NUMEL = 1 << 16
COPY_BYTES = 256 << 20  # per side, at least; large enough to leave every cache behind


def add_relu(x, y):
    return torch.relu(x + y)


def mul_relu(x):
    return torch.relu(x * 1.7)


def chain(x, y):
    return F.gelu((x * 1.7 + y) * torch.sigmoid(x)) - 0.5


CASES = {"add_relu": (add_relu, 2), "mul_relu": (mul_relu, 1), "chain": (chain, 2)}


def random_inputs(n_inputs: int, numel: int, dtype, device) -> list[torch.Tensor]:
    return [torch.randn(numel, dtype=dtype, device=device) for _ in range(n_inputs)]


def prewarm(device: torch.device, backends) -> None:
    """Pay the one-time costs of both compilers on an unrelated function, then forget it."""
    def unrelated(x):
        return torch.tanh(x) * 3.0 + 1.0

    x = torch.randn(4096, device=device)
    for backend in backends:
        common.cold_start()
        try:
            torch.compile(unrelated, backend=backend, dynamic=False)(x)
        except Exception as error:  # noqa: BLE001 - the real cases report it properly
            print(f"(pre-warm of {backend} failed: {type(error).__name__}: {error})")
    common.synchronize(device)
    kitsune.reset_fusion_stats()


def run_backend(backend: str, fn, inputs, expected, ref64, device, repeats, kitsune_log: common.WarningCollector) -> dict:
    """Cold compile, check, then time one compiled backend."""
    result: dict = dict(status="ok")
    common.cold_start()
    if backend == "kitsune":
        kitsune.reset_fusion_stats()
        kitsune_log.messages.clear()
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    try:
        result["compile_s"], out = common.cold_call(compiled, *inputs, device=device)
    except Exception as error:  # noqa: BLE001 - report and go on with the other backends
        return dict(status="FAIL", error=f"compile/run: {type(error).__name__}: {error}")

    if backend == "kitsune":
        result["fusion"] = common.kitsune_report()

    problem = common.check_output(out, expected, ref64)
    if problem is None:  # again on fresh random inputs: the same function on any input
        fresh = [torch.randn_like(t) for t in inputs]
        problem = common.check_output(compiled(*fresh), fn(*fresh), fn(*(t.double() for t in fresh)))
        del fresh
    if problem is not None:
        result.update(status="FAIL", error=f"wrong result: {problem}")
        return result
    result["rel_error_vs_fp64"] = common.relative_error(out, ref64)
    del out

    result["timing"] = common.time_ms(lambda: compiled(*inputs), device, repeats).as_dict()
    if backend == "kitsune":
        result["fusion"]["warnings"] = list(kitsune_log.messages)
    return result


def run_case(name: str, dtype_name: str, numel: int, device, repeat: int | None, backends,
             kitsune_log: common.WarningCollector) -> dict:
    fn, n_inputs = CASES[name]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    inputs = random_inputs(n_inputs, numel, dtype, device)
    expected = fn(*inputs)
    ref64 = fn(*(t.double() for t in inputs))
    nbytes = common.min_bytes(inputs, [expected])
    repeats = repeat or common.default_repeats(device, nbytes)
    row = dict(case=name, dtype=dtype_name, numel=numel, min_bytes=nbytes, repeats=repeats,
               cache_resident=common.fits_in_cache(device, nbytes), backends={})

    if "eager" in backends:
        eager = dict(status="ok", rel_error_vs_fp64=common.relative_error(expected, ref64))
        eager["timing"] = common.time_ms(lambda: fn(*inputs), device, repeats).as_dict()
        row["backends"]["eager"] = eager
    for backend in backends:
        if backend != "eager":
            row["backends"][backend] = run_backend(backend, fn, inputs, expected, ref64, device, repeats,
                                                   kitsune_log)

    for result in row["backends"].values():
        if "timing" in result:
            ms = result["timing"]["median_ms"]
            result["gb_per_s"] = common.gb_per_s(nbytes, ms)
    k = row["backends"].get("kitsune", {})
    if "timing" in k:
        for other in ("eager", "inductor"):
            if "timing" in row["backends"].get(other, {}):
                k[f"speedup_vs_{other}"] = row["backends"][other]["timing"]["median_ms"] / k["timing"]["median_ms"]
    return row


def kitsune_problems(row: dict) -> list[str]:
    """Why this row's Kitsune number may not be Kitsune's own kernels."""
    if "kitsune" not in row["backends"]:
        return []
    k = row["backends"]["kitsune"]
    fusion = k.get("fusion")
    if fusion is None:
        return [k.get("error", "no fusion report")]
    problems = []
    if fusion["num_fused"] == 0:  # None: this kitsune does not report it
        problems.append("num_fused == 0: nothing ran as a Kitsune kernel")
    problems += [f"fallback: " + (": ".join(map(str, f)) if isinstance(f, list) else str(f)) for f in fusion["fallbacks"]]
    problems += [f"logged: {message}" for message in fusion.get("warnings", [])]
    return problems


def print_case(row: dict) -> None:
    parts = []
    for backend, result in row["backends"].items():
        if "timing" in result:
            t = result["timing"]
            parts.append(f"{backend} {t['median_ms']:.3f} ms (min {t['min_ms']:.3f}, iqr {t['iqr_ms']:.3f}, "
                         f"rel.err {result['rel_error_vs_fp64']:.1e})")
        else:
            parts.append(f"{backend} FAIL")
    print(f"{row['case']:>8} {row['dtype']} x{row['repeats']}: " + "; ".join(parts))
    fusion = row["backends"].get("kitsune", {}).get("fusion")
    if fusion:
        print(f"         kitsune: num_fused={fusion['num_fused']} kernels {fusion['kernels_before']} -> "
              f"{fusion['kernels_after']}, fallbacks={len(fusion['fallbacks'])}")
    for backend, result in row["backends"].items():
        if result.get("error"):
            print(f"  !!! {backend} FAILED: {result['error'].splitlines()[0]}")
    for problem in kitsune_problems(row):
        print(f"  !!! WARNING: Kitsune did not run fused code for {row['case']} {row['dtype']}: {problem}")


def table(rows: list[dict]) -> str:
    headers = ["case", "dtype", "numel", "eager ms", "inductor ms", "kitsune ms", "vs eager", "vs inductor",
               "eager GB/s (copy%)", "inductor GB/s (copy%)", "kitsune GB/s (copy%)",
               "inductor compile s", "kitsune compile s"]
    lines = []
    for row in rows:
        b = {n: row["backends"].get(n, {}) for n in BACKENDS}
        k = b["kitsune"]
        cells = [row["case"] + ("*" if kitsune_problems(row) else ""), row["dtype"], common.format_numel(row["numel"])]
        cells += [f"{b[n]['timing']['median_ms']:.3f}" if "timing" in b[n] else "FAIL" if b[n] else "n/a"
                  for n in BACKENDS]
        cells += [f"{k[key]:.2f}x" if key in k else "n/a" for key in ("speedup_vs_eager", "speedup_vs_inductor")]
        cells += [f"{common.format_rate(b[n]['gb_per_s'])} ({100 * b[n]['share_of_copy']:.0f}%)"
                  if "gb_per_s" in b[n] else "n/a" for n in BACKENDS]
        cells += [f"{b[n]['compile_s']:.2f}" if "compile_s" in b[n] else "n/a" for n in ("inductor", "kitsune")]
        lines.append(cells)
    return common.markdown_table(headers, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_standard_arguments(parser)
    parser.add_argument("--numel", type=int, help="elements per tensor (default 64M on CUDA, 16M on the CPU, "
                                                  "64K with --quick)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeat", type=int, help="timed calls per measurement (default: by device and size)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="keep glibc's default of returning large freed blocks to the OS, so that every "
                             "call on the CPU page-faults its output in anew (default: reuse freed memory)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    common.check_device(device)
    backends = common.parse_backends(args.backends)
    numel = args.numel or (QUICK_NUMEL if args.quick else DEFAULT_NUMEL[device.type])
    repeat = args.repeat or (5 if args.quick else None)
    common.disable_compile_caches()
    common.ensure_kitsune_backend()
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # expected: caches are off
    kitsune_log = common.WarningCollector()
    logging.getLogger("kitsune").addHandler(kitsune_log)

    env = common.environment(device)
    print(f"# Pointwise fusion: eager vs Inductor vs Kitsune — {env['date']}")
    print(f"device: {env['device_name']} ({env['device']})   torch {env['torch']}   triton {env['triton']}   "
          f"kitsune {env['kitsune']}   python {env['python']}")
    env["malloc_reuse"] = common.malloc_reuse_active()
    if device.type == "cpu":
        print(f"threads: {env['threads']} of {env['cpus']} CPUs; host memory: "
              + ("freed memory reused (" + " ".join(f"{k}={v}" for k, v in common.MALLOC_REUSE_ENV.items()) + ")"
                 if env["malloc_reuse"] else "glibc default (outputs page-fault in every call)"))

    # The copy ceiling, measured before and after the cases: their difference shows the drift/noise.
    copy_bytes = numel * 4 if args.quick else max(COPY_BYTES, numel * 4)
    copy_repeats = repeat or max(20, common.default_repeats(device, 2 * copy_bytes))
    copies = [common.copy_rate(device, copy_bytes, copy_repeats)]
    print(f"device copy rate: {copies[0]['gb_per_s']:.1f} GB/s (dst.copy_(src), {copy_bytes >> 20} MiB "
          f"per side, read + write counted)")
    print("pre-warming the compilers on an unrelated function ...")
    prewarm(device, [b for b in backends if b != "eager"])

    rows = []
    for case in args.cases:
        for dtype_name in args.dtypes:
            row = run_case(case, dtype_name, numel, device, repeat, backends, kitsune_log)
            print_case(row)
            rows.append(row)

    copies.append(common.copy_rate(device, copy_bytes, copy_repeats))
    copy_gbs = max(c["gb_per_s"] for c in copies)  # the ceiling: the better of the two measurements
    for row in rows:
        for result in row["backends"].values():
            if "gb_per_s" in result:
                result["share_of_copy"] = result["gb_per_s"] / copy_gbs

    # kitsune.get_fusion_stats() is reset before each Kitsune compile: each row holds its case's report
    reports = [r["backends"].get("kitsune", {}).get("fusion") or {} for r in rows]
    problems = [r for r in rows if kitsune_problems(r)]
    print()
    print(f"device copy rate: {copies[0]['gb_per_s']:.1f} GB/s before the cases, {copies[1]['gb_per_s']:.1f} GB/s "
          f"after; shares use {copy_gbs:.1f} GB/s")
    print(f"kitsune fusion stats, all cases: num_fused={sum(f.get('num_fused') or 0 for f in reports)}, "
          f"kernels {sum(f.get('kernels_before') or 0 for f in reports)} eager -> "
          f"{sum(f.get('kernels_after') or 0 for f in reports)}, "
          f"fallbacks={sum(len(f.get('fallbacks', [])) for f in reports)}")
    if problems:
        print("!" * 100)
        print(f"WARNING: in {len(problems)} of {len(rows)} rows (marked *) Kitsune fell back to PyTorch or fused "
              f"nothing: its times there are NOT Kitsune kernels")
        print("!" * 100)
    if any(r["cache_resident"] for r in rows):
        print(f"note: some tensors fit in the {(common.cache_bytes(device) or 0) >> 20} MiB last-level cache: "
              f"repeated calls partly measure the cache, and GB/s may exceed the copy rate")

    print()
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}; "
          f"copy {common.format_rate(copy_gbs)} GB/s; median ms; vs = other time / kitsune time (>1: kitsune faster); "
          f"compile s = cold first call")
    print()
    print(table(rows))

    common.write_json(args.json, dict(benchmark="pointwise", environment=env,
                                      copy=dict(runs=copies, gb_per_s=copy_gbs), numel=numel, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
