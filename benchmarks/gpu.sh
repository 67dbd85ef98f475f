#!/usr/bin/env bash
# The GPU checks in one go, for a lent H100/H200/A100, run from the repository root:
#   LLaMA-2-7B-shaped pruning (SparseGPT vs D²Prune, s/block), 2:4 linear latency, a profile of one block,
#   and deit_base_patch16_224-shaped vision pruning. Logs go to $OUT (or benchmarks/results/gpu_logs).
# Uses the machine's own torch/transformers/timm: the package is put on PYTHONPATH, nothing is installed.
#   LAYERS=8 bash benchmarks/gpu.sh          # 8 blocks of the 7B shape (the s/block figure; 32-block estimate)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS="${OUT:-benchmarks/results/gpu_logs}"
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu_env.txt"
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$LOGS/gpu_env.txt"
timeout "${VISION_TIMEOUT:-150}" python3 benchmarks/vision_gpu.py --json "$LOGS/vision_gpu.json" 2>&1 | tee "$LOGS/gpu_vision.txt"
timeout "${LLM_TIMEOUT:-300}" python3 benchmarks/gpu.py --layers "${LAYERS:-32}" ${PROFILE:+--profile} 2>&1 | tee "$LOGS/gpu_llm.txt"
