#!/usr/bin/env bash
# The device machine's one run, from the repo root: the engine benchmark on its GPU, results
# into $OUT (the folder the device tool sends back; a new temp folder when unset). That machine
# has Python 3.12, torch, transformers, peft, sentence-transformers and triton, but no Ray, no
# pydantic, no torchao and no internet, and its Python may be read-only: the missing packages
# come as wheels carried with the run in bench/.work/wheels (git-ignored) and are installed with
# --no-deps into a folder of their own on PYTHONPATH.
#   bash bench/run_gpu_device.sh --fetch-wheels          # here, once: the pinned wheels (~13 MB)
#   device tool: command "bash bench/run_gpu_device.sh", carry ["bench/.work/wheels"], timeout_s 600
#   bash bench/run_gpu_device.sh --small --device cpu    # checks this whole script on a CPU
# The benchmark runs each variant under its own try/except and writes its results after each;
# the timeout (450 s) keeps the whole run inside 8 minutes, and a cut-off run still leaves the
# figures of the variants that finished in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python  # a checkout with its virtualenv (not carried)
else PY="$(command -v python3 || command -v python)"; fi
WHEELS=bench/.work/wheels
GPU_PYTHON=3.12  # the device machine's
# module → its wheel's file-name prefix: pydantic's own dependencies too, since --no-deps
PACKAGES="torchao:torchao pydantic:pydantic- pydantic_core:pydantic_core annotated_types:annotated_types typing_inspection:typing_inspection"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    torchao="$(sed -n 's/^fp8 = \["\(torchao==[^"]*\)"\]/\1/p' pyproject.toml)"
    pins="$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))
EOF
)"
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "$torchao" $pins
    exit 0
fi
OUT="${OUT:-$(mktemp -d /tmp/gpu_engine.XXXXXX)}"
mkdir -p "$OUT"
SITE="$(mktemp -d /tmp/gpu_site.XXXXXX)"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: none"
    wanted=()
    for entry in $PACKAGES; do
        module="${entry%%:*}" prefix="${entry#*:}"
        if ! "$PY" -c "import $module" 2>/dev/null; then
            found=("$WHEELS/$prefix"*.whl)
            if [[ -e "${found[0]}" ]]; then wanted+=("${found[@]}"); else echo "$module: missing, no wheel in $WHEELS"; fi
        fi
    done
    if (( ${#wanted[@]} )); then
        echo "installing into $SITE: ${wanted[*]##*/}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wanted[@]}" 2>&1 |
            tail -3 || echo "pip install failed: the rows that need these packages will say so"
    fi
    PYTHONPATH="$SITE:${PYTHONPATH:-}" "$PY" - <<'EOF'
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for package in ("transformers", "peft", "torchao", "pydantic", "sentence-transformers", "triton"):
    try:
        print(package, version(package))
    except PackageNotFoundError:
        print(package, "not installed")
EOF
} 2>&1 | tee "$OUT/device.txt"
set +e
PYTHONPATH="$SITE:.:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 timeout -k 10 450 "$PY" bench/gpu_engine.py --out "$OUT" "$@" \
    2>&1 | tee "$OUT/gpu_engine.log"
status=${PIPESTATUS[0]}
echo "gpu_engine.py exit status $status; results in $OUT" | tee -a "$OUT/gpu_engine.log"
exit "$status"
