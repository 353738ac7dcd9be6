#!/usr/bin/env bash
# GPU benchmark of the region detector and an in-process pipeline (see bench/gpu_bench.py).
# Runs from a plain checkout on a machine without Ray, webdataset or network:
#   bash bench/gpu.sh            # CUDA: butd-r101-c4, batch 1/8/32, fp32 + bf16, <= 8 minutes
#   bash bench/gpu.sh --cpu      # CPU smoke run (tiny config, 2 images)
# Results go to $OUT/gpu_bench.json when OUT is set, else bench/results/gpu_bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import torch, torchvision, pyarrow, cv2, PIL; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec timeout "${GPU_BENCH_TIMEOUT_S:-480}" "$PYTHON" bench/gpu_bench.py "$@"
