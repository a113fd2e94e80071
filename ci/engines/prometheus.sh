#!/usr/bin/env bash
# Prometheus (Debian's `prometheus` package), for the Kubernetes canary's PromQL tests. Only
# the binary is needed: the tests start their own server on a free port, so the package's
# service is kept from starting while it installs.
set -euo pipefail
command -v prometheus >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -q --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -1
