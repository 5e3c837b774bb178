#!/bin/bash
# Source the CANN environment (toolkit, and NNAL where installed), then run the command.
set -e
for env in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    # shellcheck disable=SC1090
    [ -f "$env" ] && source "$env"
done
# The driver's libraries come from the host mount.
export LD_LIBRARY_PATH="/usr/local/Ascend/driver/lib64:/usr/local/Ascend/driver/lib64/common:/usr/local/Ascend/driver/lib64/driver:${LD_LIBRARY_PATH}"
exec "$@"
