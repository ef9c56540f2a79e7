#!/usr/bin/env bash
# fastinf kernels on a GPU, in one command (about 3-5 minutes on an H200, capped at 8):
#
#     bash bench/gpu_check.sh
#
# 1. prints the environment (GPU, driver, python, torch, triton, pytest, pytest-benchmark);
# 2. runs tests/kernels, which switch to realistic layer shapes when CUDA is present;
# 3. runs the kernel benchmarks (Triton vs reference, each Triton timing after a passing
#    correctness check).
# Logs, JUnit XML, benchmark JSON and kernels_<device>.csv go to $OUT when set, else to
# bench/results/. Needs python (or $PYTHON) with torch, triton, pytest and pytest-benchmark
# and nothing else: fastinf.kernels is imported through a stub `fastinf` package, so the
# engine's own dependencies (diffusers, ...) need not be installed.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/bench/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

unset TRITON_INTERPRET FASTINF_KERNEL_BACKEND
export FASTINF_BENCH_DIR="$OUT_DIR"

# Python puts the working directory first on sys.path; working from the stub keeps the
# repository's full `fastinf` package (and its imports) out of the way.
STUB="$(mktemp -d)"
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/fastinf"
: >"$STUB/fastinf/__init__.py"
ln -s "$REPO/kernels" "$STUB/fastinf/kernels"
export PYTHONPATH="$STUB${PYTHONPATH:+:$PYTHONPATH}"
cd "$STUB" || exit 2
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --rootdir="$REPO" -c "$REPO/pyproject.toml")

{
    echo "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 ||
        echo "nvidia-smi unavailable"
    "$PY" - <<'PYEOF'
import importlib
import platform
import sys

import torch

print("python", sys.version.split()[0], "|", platform.platform())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", props.name, "| capability", f"{props.major}.{props.minor}",
          "| SMs", props.multi_processor_count, "| memory GiB", round(props.total_memory / 2**30))
for name in ("triton", "pytest", "pytest_benchmark", "numpy"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:  # report, keep going
        print(name, "MISSING:", error)
import fastinf.kernels
from fastinf.kernels import dispatch

print("fastinf.kernels from", fastinf.kernels.__file__)
print("tl.dot precision", dispatch.dot_precision(), "| triton importable", dispatch.triton_available())
PYEOF
} 2>&1 | tee "$OUT_DIR/gpu_check_env.txt"

echo "== tests/kernels"
timeout 300 "${PYTEST[@]}" "$REPO/tests/kernels" --confcutdir="$REPO/tests/kernels" \
    --junitxml="$OUT_DIR/kernel_tests.xml" 2>&1 | tee "$OUT_DIR/kernel_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== kernel benchmarks"
timeout 170 "${PYTEST[@]}" "$REPO/bench/test_kernels_bench.py" --confcutdir="$REPO/bench" \
    --benchmark-json="$OUT_DIR/kernel_bench.json" --benchmark-columns=min,median,max,rounds \
    2>&1 | tee "$OUT_DIR/kernel_bench.log"
bench_status=${PIPESTATUS[0]}

echo "== done: tests exit ${tests_status}, benchmarks exit ${bench_status} (124 = timed out);" \
    "outputs in $OUT_DIR"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
