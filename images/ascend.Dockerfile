# Ascend runtime: NPU device workers (CANN + torch + torch_npu, hccl).
# The CANN base images are published for linux/arm64 (Kunpeng hosts) and linux/amd64; pick with
#   docker build --platform linux/arm64 -f images/ascend.Dockerfile -t facenet-ascend .
# Override CANN_IMAGE for another CANN release; it must suit the torch_npu version below.
ARG CANN_IMAGE=quay.io/ascend/cann:8.3.rc1-910b-ubuntu22.04-py3.11
FROM ${CANN_IMAGE}

# The host's HwHiAiUser group owns /dev/davinci*: the container user joins a group with that GID.
ARG ASCEND_GID=1000
# torch and torch_npu versions must be equal; the one pin of the pair is the `npu` extra in
# pyproject.toml. The CPU index keeps x86_64 hosts off the CUDA build of torch.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app
COPY pyproject.toml ./
# The project itself (`pip install .`) has no version to pin; its dependencies are pinned in pyproject.
# hadolint ignore=DL3013,DL3059
RUN mkdir -p facenet services \
 && touch facenet/__init__.py services/__init__.py \
 && pip install --extra-index-url "${TORCH_INDEX}" ".[npu]" \
 && pip uninstall -y facenet-stack \
 && rm -rf facenet services build

COPY facenet ./facenet
COPY services ./services
COPY scripts ./scripts
COPY images/ascend-entrypoint.sh /usr/local/bin/ascend-entrypoint.sh
RUN pip install --no-deps . \
 && if getent group HwHiAiUser >/dev/null; then groupmod -g "${ASCEND_GID}" HwHiAiUser; \
    else groupadd -g "${ASCEND_GID}" HwHiAiUser; fi \
 && useradd --create-home --uid 10001 --gid HwHiAiUser facenet \
 && mkdir -p /data /prep /runs /raw \
 && chown facenet /data /prep /runs \
 && chmod 0755 /usr/local/bin/ascend-entrypoint.sh

USER 10001
ENTRYPOINT ["/usr/local/bin/ascend-entrypoint.sh"]
CMD ["facenet-cli", "--help"]
