#!/usr/bin/env bash
# `make base-images`: local stand-ins for the python and postgres base images, built from Debian
# packages, for a host that reaches no container registry (CI here is one). A normal host never needs it.
#
#   images/base/build.sh PYTHON_TAG POSTGRES_TAG
#
# 1. debootstrap of Debian bookworm (minbase) from DEBIAN_MIRROR, imported as facenet-base/debian:bookworm
#    (kept: delete that image or set REBUILD=1 to bootstrap again);
# 2. PYTHON_TAG from images/base/python.Dockerfile (Python 3.11 and pip from Debian);
# 3. POSTGRES_TAG from images/base/postgres.Dockerfile (postgresql-15, the official entrypoint contract).
# Needs root (debootstrap) and a Docker engine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON_TAG=${1:?usage: images/base/build.sh PYTHON_TAG POSTGRES_TAG}
POSTGRES_TAG=${2:?usage: images/base/build.sh PYTHON_TAG POSTGRES_TAG}
DEBIAN_TAG=facenet-base/debian:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ "${REBUILD:-0}" = 1 ] || ! docker image inspect "$DEBIAN_TAG" >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "make base-images: debootstrap needs root (sudo make base-images)" >&2
        exit 2
    fi
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
    root=$(mktemp -d /var/tmp/facenet-bookworm.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    echo "base-images: debootstrap bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$root" "$MIRROR" > "$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; echo "base-images: debootstrap failed (log $root.log)" >&2; exit 1; }
    rm -f "$root.log"
    # No package lists or caches in the image; apt-get update fetches them as in any Debian image.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' - "$DEBIAN_TAG" >/dev/null
    echo "base-images: $DEBIAN_TAG"
fi
build() {  # docker build, quiet unless it fails (the context is images/base only)
    local out
    out=$(docker build --build-arg DEBIAN_IMAGE="$DEBIAN_TAG" -f "images/base/$1.Dockerfile" -t "$2" images/base 2>&1) \
        || { printf '%s\n' "$out" >&2; echo "base-images: building $2 failed" >&2; exit 1; }
}
build python "$PYTHON_TAG"
echo "base-images: $PYTHON_TAG ($(docker run --rm "$PYTHON_TAG" python --version 2>&1))"
build postgres "$POSTGRES_TAG"
echo "base-images: $POSTGRES_TAG ($(docker run --rm --entrypoint postgres "$POSTGRES_TAG" --version))"
