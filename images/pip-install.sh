#!/bin/sh
# `pip install` for every image build, with the site's package sources (README: Air-gapped and
# mirrored hosts). Settings arrive as build args from .env through docker-compose.yml:
#   WHEELHOUSE=1         install only from the wheelhouse bind-mounted at /wheelhouse, no index at all
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST   a mirror; empty = PyPI
#   TORCH_INDEX          `pip-install --torch ...` installs those packages from this index (CPU torch)
# and the build secret pip_ca: a CA bundle for a TLS-intercepting proxy (empty = the image's own CAs).
# Everything goes through PIP_* variables, so the isolated environment pip builds a project in sees
# the same sources.
set -eu
torch=0
if [ "${1:-}" = "--torch" ]; then torch=1; shift; fi
if [ -s /run/secrets/pip_ca ]; then
    export PIP_CERT=/run/secrets/pip_ca
fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    eval "value=\${$var:-}"
    if [ -n "$value" ]; then export "$var"; else unset "$var"; fi
done
if [ "${WHEELHOUSE:-0}" = 1 ]; then
    if ! ls /wheelhouse/*.whl >/dev/null 2>&1; then
        echo "WHEELHOUSE=1 but ./wheelhouse holds no wheels: run 'make wheelhouse' on a connected host first" >&2
        exit 2
    fi
    unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL
    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse
elif [ "$torch" = 1 ] && [ -n "${TORCH_INDEX:-}" ]; then
    export PIP_INDEX_URL="$TORCH_INDEX"
    unset PIP_EXTRA_INDEX_URL
fi
exec python -m pip install --no-cache-dir --disable-pip-version-check "$@"
