# Ascend runtime: NPU device workers (CANN + torch + torch_npu, hccl).
# The CANN base images are published for linux/arm64 (Kunpeng hosts) and linux/amd64.
# The three pins (CANN_IMAGE, ASCEND_TORCH with ASCEND_TORCHVISION, TORCH_NPU) have no default here:
# they live in images/ascend/pins.env, a row of TorchNPU's compatibility table (images/ascend/compat.json),
# and compose passes them (`make up PROFILE=npu`). By hand:
#   docker build --platform linux/arm64 $(sed -n 's/^\([A-Z_]*=.*\)/--build-arg \1/p' images/ascend/pins.env) \
#     -f images/ascend.Dockerfile -t facenet-ascend .
ARG CANN_IMAGE
FROM ${CANN_IMAGE}

ARG ASCEND_TORCH
ARG ASCEND_TORCHVISION
ARG TORCH_NPU
# The host's HwHiAiUser group owns /dev/davinci*: the container user joins a group with that GID.
ARG ASCEND_GID=1000
# The CPU index: PyPI's torch 2.12 is a CUDA build on x86_64 and on aarch64 alike (3 GB of CUDA libraries an
# Ascend host never uses); torch_npu's README installs torch from this index (Ascend/pytorch
# v26.1.0-pytorch2.12.0:README.md, "pip3 install torch ... --index-url https://download.pytorch.org/whl/cpu").
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG WHEELHOUSE=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FACENET_ASCEND_PINS_DIR=/app/images/ascend

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY images/pip-install.sh /usr/local/bin/pip-install
WORKDIR /app
COPY pyproject.toml ./
# The project itself (`pip install .`) has no version to pin; its dependencies are pinned in pyproject.
# hadolint ignore=DL3059
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    if [ -z "${ASCEND_TORCH}" ] || [ -z "${TORCH_NPU}" ]; then \
      echo "ASCEND_TORCH/TORCH_NPU unset: pass images/ascend/pins.env as build args (make up does)" >&2; exit 2; fi \
 && mkdir -p facenet services \
 && touch facenet/__init__.py services/__init__.py \
 && pip-install --torch "torch==${ASCEND_TORCH}" "torchvision==${ASCEND_TORCHVISION}" \
 && pip-install "torch_npu==${TORCH_NPU}" . \
 && pip uninstall -y facenet-stack \
 && rm -rf facenet services build

COPY facenet ./facenet
COPY services ./services
COPY scripts ./scripts
# doctor checks the installed torch/torch_npu/CANN against the pins and TorchNPU's table (FACENET_ASCEND_PINS_DIR).
COPY images/ascend/compat.json images/ascend/pins.env ./images/ascend/
COPY images/ascend/entrypoint.sh /usr/local/bin/ascend-entrypoint.sh
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    pip-install --no-deps . \
 && if getent group HwHiAiUser >/dev/null; then groupmod -g "${ASCEND_GID}" HwHiAiUser; \
    else groupadd -g "${ASCEND_GID}" HwHiAiUser; fi \
 && useradd --create-home --uid 10001 --gid HwHiAiUser facenet \
 && mkdir -p /data /prep /runs /raw \
 && chown facenet /data /prep /runs \
 && chmod 0755 /usr/local/bin/ascend-entrypoint.sh

USER 10001
ENTRYPOINT ["/usr/local/bin/ascend-entrypoint.sh"]
CMD ["facenet-cli", "--help"]
