#!/usr/bin/env bash
# The GPU checks as one command, on a machine with a CUDA GPU, offline, its torch and the other
# dependencies already there: installs this checkout (no dependencies, no downloads), runs the tests
# that compare the GPU's audits with the CPU's, then the Llama-2-7B-shaped benchmark.
#
# Usage: bash bench/gpu.sh [LAYERS] [OUT]   (LAYERS 32 by default; OUT defaults to $OUT, else bench/.work/gpu-out)
# OUT receives the device's description, both logs and benchmarks-gpu.md, which the benchmark
# rewrites after each step (and which is copied to docs/ at the end). Exit status: non-zero when the
# tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
layers=${1:-32}
out=${2:-${OUT:-bench/.work/gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU')" \
    | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
python3 bench/gpu.py --layers "$layers" --doc "$out/benchmarks-gpu.md" 2>&1 | tee "$out/gpu.log"
bench=${PIPESTATUS[0]}
cp "$out/benchmarks-gpu.md" docs/ 2>/dev/null
exit $((tests || bench))
