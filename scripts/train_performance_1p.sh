#!/usr/bin/env bash
# ModelZoo-compatible: bash scripts/train_performance_1p.sh --data_path=DIR [trainer flags]
# Seed settings for this case live in facenet/train/modelzoo.py (PRESETS); FACENET_NPROC overrides the
# process count and FACENET_DEVICE the device (default: auto = npu, then cuda, then cpu).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" -m facenet.train.modelzoo performance_1p "$@"
