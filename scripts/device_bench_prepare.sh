#!/usr/bin/env bash
# Builds .device/ (ignored by git) for scripts/device_bench.sh: the facenet-pytorch wheel the GPU machine
# lacks, 8 people x 500 distinct MTCNN crops of the sample photos (the training data, linked 5x there) and
# 8 x 120 raw photos (the MTCNN benchmark), about 45 MB. Takes ~15 min on 2 cores; reruns reuse the cache.
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .device
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
ls .device/facenet_pytorch-2.5.3-*.whl >/dev/null 2>&1 || \
    $PY -m pip download -q --no-deps --only-binary=:all: -d .device facenet-pytorch==2.5.3
$PY - <<'EOF'
import os, shutil
from facenet.samples import build_sample_dataset, cache_dir, make_raw_identities
prep = build_sample_dataset(os.path.join(cache_dir(), "bench-data", "v2-500"), per_identity=500, workers=2)
raw = os.path.join(cache_dir(), "bench-data", "raw-960")
make_raw_identities(raw, per_identity=120)
for src, dst in ((os.path.join(prep, "train"), ".device/crops"), (raw, ".device/raw960")):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
EOF
du -sh .device
