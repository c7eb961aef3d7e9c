#!/usr/bin/env bash
# One device call: the kernels' GPU tests, then the kernel benchmark (docs/BENCHMARKS.md).
# Usage, in the repository root on the GPU machine: bash benchmarks/gpu_kernels.sh [extra kernel_bench args]
set -euo pipefail
out=${OUT:-/tmp/mmlora-out}
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-cache PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q tests/kernels -m gpu --noconftest -n 8 -p no:cacheprovider 2>&1 | tail -3 | tee "$out/gpu_tests.txt"
python3 benchmarks/kernel_bench.py --profile --repeat-ms 40 --rows 1,2,4,8,16,64,256,4096 \
    --variants '{"row_path_to_8":{"per_row_max_rows":8},"no_plan":{"plan":false}}' \
    --json "$out/bench.json" --markdown "$out/bench.md" "$@"
