#!/usr/bin/env bash
# Unmaintained probe (issue 15/16, 2026-12-07): the first GPU checks of the new kernels, each bounded,
# logs under $OUT. Usage on the device machine: bash benchmarks/probes/gpu_checks.sh [seconds per step]
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-./gpu_out}"; step="${1:-90}"
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e .
run() { local name=$1; shift; echo "== $name"; timeout -k 5 "$step" "$@" > "$out/$name.log" 2>&1; echo "exit $?"; tail -25 "$out/$name.log"; }
run attention python3 benchmarks/bench_attention.py --quick --json "$out/attention.json"
run matmul python3 benchmarks/bench_matmul_epilogue.py --quick --json "$out/matmul.json"
run lm_head python3 benchmarks/probes/lm_head_gpu_check.py 8192 768 50257 8192 2048 128256
run fold python3 benchmarks/probes/fold_gpu_check.py none
