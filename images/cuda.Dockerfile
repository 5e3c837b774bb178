# CUDA runtime: NVIDIA GPU device workers (nccl, bf16 autocast).
# PyPI's torch wheels bundle the CUDA runtime; the host needs the NVIDIA driver and container toolkit.
# Built by compose (`make up PROFILE=gpu`) with the settings of .env; by hand:
#   docker build -f images/cuda.Dockerfile -t facenet-cuda .
ARG CUDA_IMAGE=python:3.11.11-slim-bookworm
FROM ${CUDA_IMAGE}

ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG WHEELHOUSE=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY images/pip-install.sh /usr/local/bin/pip-install
WORKDIR /app
COPY pyproject.toml ./
COPY images/requirements/cuda.txt /tmp/requirements-cuda.txt
# torch from the main index (PIP_INDEX_URL or PyPI): the CUDA build.
# hadolint ignore=DL3059
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    mkdir -p facenet services \
 && touch facenet/__init__.py services/__init__.py \
 && pip-install ${TORCH} -r /tmp/requirements-cuda.txt \
 && pip-install . \
 && pip uninstall -y facenet-stack \
 && rm -rf facenet services build

COPY facenet ./facenet
COPY services ./services
COPY scripts ./scripts
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    pip-install --no-deps . \
 && useradd --create-home --uid 10001 facenet \
 && mkdir -p /data /prep /runs /raw \
 && chown facenet /data /prep /runs

USER 10001
CMD ["facenet-cli", "--help"]
