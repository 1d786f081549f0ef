#!/usr/bin/env bash
# The device machine's one run, from the repo root: the engine benchmark on its GPU, results
# into $OUT (the folder the device tool sends back). It has torch, transformers, peft and
# sentence-transformers but no Ray and no internet, so torchao (FP8) and pydantic (the engine's
# spec) come as wheels carried with the run in bench/.work/wheels (git-ignored, ~12 MB):
#   bash bench/run_gpu_device.sh --fetch-wheels          # here, once: the pinned wheels
#   device tool: command "bash bench/run_gpu_device.sh", carry ["bench/.work/wheels"], timeout_s 600
#   bash bench/run_gpu_device.sh --small --device cpu    # checks this whole script on a CPU
# The timeout (540 s) keeps a runaway inside the device budget; the benchmark writes its
# results after every workload, so a cut-off run still leaves figures in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(command -v python || command -v python3)"
WHEELS=bench/.work/wheels
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    torchao="$(sed -n 's/^fp8 = \["\(torchao==[^"]*\)"\]/\1/p' pyproject.toml)"
    "$PY" -m pip download "$torchao" --no-deps -d "$WHEELS"
    pydantic="pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')"
    for version in 3.10 3.11 3.12 3.13; do  # pydantic-core is built per Python version
        "$PY" -m pip download "$pydantic" --only-binary=:all: --python-version "$version" \
            --platform manylinux2014_x86_64 -d "$WHEELS"
    done
    exit 0
fi
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: none"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    for module in pydantic torchao; do
        "$PY" -c "import $module" 2>/dev/null ||
            "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$module" 2>&1 | tail -1 ||
            echo "$module: not installed (no wheel in $WHEELS?)"
    done
} 2>&1 | tee "$OUT/device.txt"
PYTHONPATH=. timeout -k 10 540 "$PY" bench/gpu_engine.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_engine.log"
