#!/bin/bash
# Source the CANN environment (toolkit, and NNAL where installed), then run the command.
# CANN 9 images keep the toolkit's set_env.sh under ascend-toolkit/ (a link to cann-X) and NNAL's at nnal/;
# older ones had NNAL's at nnal/atb/ (Ascend/cann-container-image, cann/*/Dockerfile).
set -e
toolkit=/usr/local/Ascend/ascend-toolkit/set_env.sh
# shellcheck disable=SC1090
[ -f "$toolkit" ] && source "$toolkit"
for env in /usr/local/Ascend/nnal/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$env" ]; then
        # shellcheck disable=SC1090
        source "$env"
        break
    fi
done
# The driver's libraries come from the host mount.
export LD_LIBRARY_PATH="/usr/local/Ascend/driver/lib64:/usr/local/Ascend/driver/lib64/common:/usr/local/Ascend/driver/lib64/driver:${LD_LIBRARY_PATH}"
exec "$@"
