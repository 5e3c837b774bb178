# Stand-in for the python base image (PYTHON_IMAGE), for hosts that reach no container registry:
# Debian bookworm's Python 3.11 and pip in a venv on PATH, so `python` and `pip install` behave as in
# the official image. Built by `make base-images` (images/base/build.sh) from a debootstrap of bookworm.
ARG DEBIAN_IMAGE=facenet-base/debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV LANG=C.UTF-8 PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/python \
 && python --version && pip --version

CMD ["python"]
