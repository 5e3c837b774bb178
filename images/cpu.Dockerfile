# CPU runtime: preprocessing workers, CPU device workers, Flower, Redis and `make cli`.
# Build: docker build -f images/cpu.Dockerfile -t facenet-cpu .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch from the CPU index: the PyPI default is a multi-GB CUDA build.
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# redis-server: the stack's Redis runs from this image through the same entrypoint as the local stack.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first (a layer that survives source edits): install the project's requirements from
# pyproject.toml with empty packages, then drop the placeholder install.
COPY pyproject.toml ./
# The project itself (`pip install .`) has no version to pin; its dependencies are pinned in pyproject.
# hadolint ignore=DL3013,DL3059
RUN mkdir -p facenet services \
 && touch facenet/__init__.py services/__init__.py \
 && pip install --index-url "${TORCH_INDEX}" ${TORCH} \
 && pip install . \
 && pip uninstall -y facenet-stack \
 && rm -rf facenet services build

COPY facenet ./facenet
COPY services ./services
COPY scripts ./scripts
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 facenet \
 && mkdir -p /data /prep /runs /raw /redis-data /flower \
 && chown facenet /data /prep /runs /redis-data /flower

USER 10001
CMD ["facenet-cli", "--help"]
