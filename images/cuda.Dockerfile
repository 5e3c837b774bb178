# CUDA runtime: NVIDIA GPU device workers (nccl, bf16 autocast).
# PyPI's torch wheels bundle the CUDA runtime; the host needs the NVIDIA driver and container toolkit.
# Build: docker build -f images/cuda.Dockerfile -t facenet-cuda .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app
COPY pyproject.toml ./
# The project itself (`pip install .`) has no version to pin; its dependencies are pinned in pyproject.
# hadolint ignore=DL3013,DL3059
RUN mkdir -p facenet services \
 && touch facenet/__init__.py services/__init__.py \
 && pip install ${TORCH} nvidia-ml-py==13.615.71 \
 && pip install . \
 && pip uninstall -y facenet-stack \
 && rm -rf facenet services build

COPY facenet ./facenet
COPY services ./services
COPY scripts ./scripts
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 facenet \
 && mkdir -p /data /prep /runs /raw \
 && chown facenet /data /prep /runs

USER 10001
CMD ["facenet-cli", "--help"]
