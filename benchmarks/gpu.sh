#!/usr/bin/env bash
# Run on a lent GPU machine from the repository root: installs the package, then the GPU benchmark.
set -euo pipefail
python3 -m pip install -q -e . 2>/dev/null || python3 -m pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 benchmarks/gpu.py "$@"
