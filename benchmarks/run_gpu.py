"""Run the maintained GPU benchmarks once, in one command of under 10 minutes, and
summarise them; optionally time a baseline source tree on the same machine.

    bash benchmarks/run_gpu.sh                           # installs the project, then runs this
    KITSUNE_SRC=base/src bash benchmarks/run_gpu.sh      # and the baseline tree base/src
    python3 benchmarks/run_gpu.py --device cpu --quick --benchmarks host   # check the driver on the CPU

What runs, in this order (each a separate process; "new" is this tree's
src/, "base" the tree named by KITSUNE_SRC or --baseline-src, prepended to
PYTHONPATH; the benchmark scripts are this tree's in both):

    reductions  bench_reductions.py --models gpt2,bert: softmax, layer_norm+GELU,
                RMSNorm, cross-entropy, GELU backward + bias gradient, MSE,
                the block's fwd+bwd, GPT-2 small and BERT-base inference
    training    bench_training.py --rounds 7 --steps 30: the block and GPT-2
                small, optimizer steps
    pointwise   bench_pointwise.py: add+relu, mul+relu, chain; fp32 and bf16
    host        bench_host.py: host time of a tiny block step and a tiny call

The baseline runs each benchmark with `--backends eager,kitsune` (Inductor does
not change with Kitsune's source; eager shows the machine's drift between the
two runs) right after the new run of the same benchmark. A step is skipped
when the time left (`--budget-s`, counted from RUN_GPU_START, which
run_gpu.sh sets before installing) is below its estimate, and killed when it
runs past the time left.

Writes to --out (default $OUT, else ./gpu_out), four flat files: new.json and
base.json ({benchmark: its JSON}), run_gpu.log (every benchmark's output) and
summary.md, the table printed last: Kitsune's figure per case in the new and
the base run, their ratio (new / base: > 1 means the new tree is slower), the
new run's Inductor figure, and the last figure recorded in RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START = float(os.environ.get("RUN_GPU_START") or time.time())

# benchmark -> (script, arguments of the full-size run, estimated seconds: new run, baseline run).
# The estimates come from the H200 logs of 2026-12-02 (compile times, rounds) plus process start-up;
# their sum (485 s) leaves room in the 540 s budget, so a step is skipped only after others overran.
STEPS = {
    "reductions": ("bench_reductions.py", ["--models", "gpt2,bert"], 120, 70),
    "training": ("bench_training.py", ["--rounds", "7", "--steps", "30"], 100, 60),
    "pointwise": ("bench_pointwise.py", [], 45, 30),
    "host": ("bench_host.py", [], 35, 25),
}

# The last figures in RESULTS.md, Kitsune's, to read the new ones against: (figure, where from).
# Reductions: GPU busy ms (and wall ms for the host-bound block and models); training ms/step;
# pointwise median ms; host us per call.
LAST = {
    ("reductions", "softmax"): (0.0692, "H200 2026-12-02d, GPU ms"),
    ("reductions", "ln_gelu"): (0.0744, "H200 2026-12-02d, GPU ms"),
    ("reductions", "rmsnorm"): (0.0669, "H200 2026-12-02d, GPU ms"),
    ("reductions", "cross_entropy"): (0.1416, "H200 2026-12-02e, GPU ms"),
    ("reductions", "bias_grad"): (0.1595, "H200 2026-12-02e, GPU ms"),
    ("reductions", "mse_loss"): (0.0646, "H200 2026-12-02e probe, GPU ms"),
    ("reductions", "block_fwd_bwd"): (0.3874, "H200 2026-12-02f, GPU ms"),
    ("reductions", "block_fwd_bwd wall"): (0.6328, "H200 2026-12-02f, wall ms"),
    ("reductions", "gpt2"): (3.4695, "H200 2026-12-02d, GPU ms"),
    ("reductions", "gpt2 wall"): (3.4855, "H200 2026-12-02d, wall ms"),
    ("reductions", "bert"): (3.5957, "H200 2026-12-02d, GPU ms"),
    ("reductions", "bert wall"): (3.5935, "H200 2026-12-02d, wall ms"),
    ("training", "block"): (0.863, "H200 2026-12-02c, ms/step"),
    ("training", "gpt2"): (7.110, "H200 2026-12-02c, ms/step"),
    ("pointwise", "add_relu fp32"): (0.268, "H100 2026-11-25, ms"),
    ("pointwise", "add_relu bf16"): (0.135, "H100 2026-11-25, ms"),
    ("pointwise", "mul_relu fp32"): (0.182, "H100 2026-11-25, ms"),
    ("pointwise", "mul_relu bf16"): (0.093, "H100 2026-11-25, ms"),
    ("pointwise", "chain fp32"): (0.268, "H100 2026-11-25, ms"),
    ("pointwise", "chain bf16"): (0.146, "H100 2026-11-25, ms"),
    ("host", "block_step"): (477.0, "H200 2026-12-02, us (host_overhead.py --cuda)"),
    ("host", "pointwise_call"): (48.0, "H100 2026-11-25, us"),
}


def time_left(budget_s: float) -> float:
    return budget_s - (time.time() - START)


def run_step(bench, label, src, extra, args, log, workdir) -> dict | None:
    """Run one benchmark as a child process with `src` first on PYTHONPATH; its JSON, or None."""
    script, full_args, new_s, base_s = STEPS[bench]
    estimate = base_s if label == "base" else new_s
    if args.quick:
        estimate /= 3
    left = time_left(args.budget_s)
    header = f"==== {label} {bench}: {left:.0f} s left, estimate {estimate:.0f} s"
    if left < estimate:
        print(f"{header}: SKIPPED (not enough time left)", flush=True)
        log.write(f"{header}: SKIPPED\n")
        return None
    json_path = workdir / f"{label}_{bench}.json"
    command = [sys.executable, str(HERE / script), "--device", args.device, "--json", str(json_path),
               *(["--quick"] if args.quick else full_args), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p))
    print(f"{header}: {' '.join(command[1:])}", flush=True)
    log.write(f"{header}\n$ PYTHONPATH={src} {' '.join(command)}\n")
    log.flush()
    started = time.time()
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                             start_new_session=True)
    try:
        rc = child.wait(timeout=max(left - 10, 1))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the benchmark and Inductor's compile workers
        child.wait()
        rc = "killed (out of time)"
    line = f"==== {label} {bench}: exit {rc} after {time.time() - started:.0f} s"
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()
    return json.loads(json_path.read_text()) if json_path.exists() else None


def kitsune_figures(bench: str, payload: dict | None, backend: str = "kitsune") -> dict:
    """{case: the figure LAST holds for it} of one backend in one benchmark's JSON."""
    if not payload:
        return {}
    out = {}
    if bench == "reductions":
        for case, res in {**payload.get("cases", {}), **payload.get("models", {})}.items():
            entry = res.get(backend, {})
            wall = entry.get("timing", {}).get("median_ms")
            out[case] = entry.get("gpu_busy_ms") or wall
            if "gpu_busy_ms" in entry and (case == "block_fwd_bwd" or "tokens" in res):  # host-bound: wall too
                out[f"{case} wall"] = wall
    elif bench == "training":
        for model, res in payload.get("models", {}).items():
            out[model] = res.get(backend, {}).get("timing", {}).get("median_ms")
    elif bench == "pointwise":
        for row in payload.get("rows", []):
            out[f"{row['case']} {row['dtype']}"] = row["backends"].get(backend, {}).get("timing", {}).get("median_ms")
    elif bench == "host":
        for case, res in payload.get("cases", {}).items():
            out[case] = res.get(backend, {}).get("best_us")
    return out


def summary(new: dict, base: dict, baseline_src) -> str:
    """The comparison table: per benchmark and case, Kitsune new / base / ratio, Inductor new, last recorded."""
    def cell(value):
        return "n/a" if value is None else f"{value:.4g}"

    lines = ["| benchmark | case | kitsune new | kitsune base | new / base | eager new / base | inductor new "
             "| last in RESULTS.md |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for bench in STEPS:
        if bench not in new and bench not in base:
            continue
        k_new, k_base = kitsune_figures(bench, new.get(bench)), kitsune_figures(bench, base.get(bench))
        inductor = kitsune_figures(bench, new.get(bench), "inductor")
        e_new, e_base = kitsune_figures(bench, new.get(bench), "eager"), kitsune_figures(bench, base.get(bench), "eager")
        for case in dict.fromkeys([*k_new, *k_base]):
            a, b = k_new.get(case), k_base.get(case)
            ratio = f"{a / b:.3f}" if a and b else "n/a"
            ea, eb = e_new.get(case), e_base.get(case)
            drift = f"{ea / eb:.3f}" if ea and eb else "n/a"
            last = LAST.get((bench, case))
            last_text = f"{last[0]:.4g} ({last[1]})" if last else "n/a"
            lines.append(f"| {bench} | {case} | {cell(a)} | {cell(b)} | {ratio} | {drift} | "
                         f"{cell(inductor.get(case))} | {last_text} |")
    notes = ["", "Units: reductions GPU busy ms on CUDA (wall ms on the CPU); training ms per step; pointwise ms; "
                 "host us per call (best round). new / base > 1: the new tree is slower; eager new / base "
                 "shows the machine's drift between the two runs (eager's code is the same in both)."]
    for label, runs in (("new", new), ("base", base)):
        for bench, payload in runs.items():
            env = payload.get("environment", {})
            notes.append(f"{label} {bench}: kitsune from {env.get('kitsune_file')}, {env.get('device_name')}, "
                         f"torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date')}")
            expected = REPO / "src" if label == "new" else baseline_src
            if expected and not str(env.get("kitsune_file", "")).startswith(str(Path(expected).resolve())):
                notes.append(f"WARNING: {label} {bench} did not import kitsune from {expected}")
    return "\n".join(lines + notes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", default=os.environ.get("KITSUNE_SRC") or None,
                        help="a kitsune source tree (the folder holding kitsune/) to time as the baseline "
                             "(default: $KITSUNE_SRC; none: no baseline)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="folder for the four output files")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds from RUN_GPU_START (or this script's start) to finish in (default 540)")
    parser.add_argument("--benchmarks", default=",".join(STEPS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the driver, e.g. on the CPU)")
    args = parser.parse_args()
    baseline = Path(args.baseline_src).resolve() if args.baseline_src else None
    if baseline and not (baseline / "kitsune" / "__init__.py").exists():
        raise SystemExit(f"--baseline-src / KITSUNE_SRC: {baseline} has no kitsune/__init__.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run_gpu-"))  # each step's JSON, merged into new/base.json
    new, base = {}, {}
    with open(out / "run_gpu.log", "a") as log:
        for bench in [b for b in args.benchmarks.split(",") if b]:
            if bench not in STEPS:
                raise SystemExit(f"--benchmarks: unknown {bench!r}; choose from {','.join(STEPS)}")
            result = run_step(bench, "new", REPO / "src", [], args, log, workdir)
            if result:
                new[bench] = result
                (out / "new.json").write_text(json.dumps(new, indent=1))  # after every step: a kill keeps them
            if baseline:
                result = run_step(bench, "base", baseline, ["--backends", "eager,kitsune"], args, log, workdir)
                if result:
                    base[bench] = result
                    (out / "base.json").write_text(json.dumps(base, indent=1))
    text = summary(new, base, baseline)
    (out / "summary.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\n{time.time() - START:.0f} s in all; files in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
