#!/usr/bin/env bash
# The accelerator fast path's one bench table, for a lent GPU machine (issue 13): run from the repository
# root there, with the wheels this project needs beyond torch carried in .device/ (facenet-pytorch at least:
# `pip download facenet-pytorch==2.5.3 --no-deps -d .device`). Writes $OUT/bench_cuda.json and prints the table.
#   run(command="bash scripts/device_bench.sh", carry=[".device"], timeout_s=560)
set -euo pipefail
OUT=${OUT:-build}
export PYTHONUNBUFFERED=1 FACENET_CACHE=${FACENET_CACHE:-/tmp/facenet-cache}
pip install -q --no-deps --no-index .device/*.whl 2>&1 | tail -2 || true
python -c "import torch, facenet_pytorch; print('torch', torch.__version__, 'cuda', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
# Training at batch 512 (reference fp32, ours eager bf16, ours compiled, ceiling, each with MFU), the loader
# alone, and MTCNN photo by photo and batched on the GPU. 3 epochs keep it inside one call.
timeout 520 python -m facenet.bench --device cuda --only detect,loader,train --batch-size 512 --epochs 3 \
    --workers 8 --raw-per-identity 120 --train-per-identity 2500 --compile auto --out "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log"
