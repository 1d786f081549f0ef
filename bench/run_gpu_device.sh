#!/usr/bin/env bash
# What the device machine runs from the repo root: the engine benchmark on its GPU, results
# into $OUT (the folder the device tool sends back). No Ray and no internet are needed there.
# The timeout stops a runaway well inside the ~15 min device budget; the script writes its
# results after every workload, so a cut-off run still leaves figures in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=. exec timeout -k 10 300 "$(command -v python || command -v python3)" \
    bench/gpu_engine.py --out "${OUT:-bench/results/gpu}" "$@"
