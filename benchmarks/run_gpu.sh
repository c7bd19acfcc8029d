#!/usr/bin/env bash
# One run of the maintained GPU benchmarks on a device machine, in under 10 minutes
# (what runs and what it writes: benchmarks/run_gpu.py's docstring).
#
#   bash benchmarks/run_gpu.sh                          # this tree
#   KITSUNE_SRC=base/src bash benchmarks/run_gpu.sh     # and a baseline tree (its src/ folder), Kitsune alone
#
# Output: $OUT/{new.json,base.json,run_gpu.log,summary.md}; the summary table is printed last.
set -euo pipefail
export RUN_GPU_START="${RUN_GPU_START:-$(date +%s)}"  # the driver's time budget counts the install too
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation -e .
exec python3 benchmarks/run_gpu.py "$@"
