#!/usr/bin/env bash
# Every accelerator figure from one call on a lent GPU machine (issue 24): run from the repository root there,
# with what the machine lacks carried in .device/ (scripts/device_bench_prepare.sh builds it here: the
# facenet-pytorch wheel, 4,000 distinct sample crops, 960 raw photos). Writes $OUT/bench_gpu.json (rewritten
# after each phase), profile.txt and two gzipped chrome traces, and prints the table last.
#   run(command="bash scripts/device_bench.sh", carry=[".device"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-build/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FACENET_CACHE=/tmp/facenet-cache
PY=python3
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/*.whl || exit 3
export PYTHONPATH=/tmp/site
$PY -c "import torch, facenet_pytorch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
timeout "${BENCH_TIMEOUT:-500}" $PY -m facenet.bench.device_run --out "$OUT" --crops .device/crops \
    --raw .device/raw960 --deadline "${BENCH_DEADLINE:-460}" "$@" 2>&1 | tee "$OUT/bench_gpu.log" \
    | grep -v "^  \|it/s\]$"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv || true
