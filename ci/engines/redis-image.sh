#!/usr/bin/env bash
# A Redis image made from Debian's Redis server binary, for Compose stacks in tests and
# examples: no registry needed. Idempotent: an image with the tag already there is kept.
#
#   ci/engines/redis-image.sh [TAG]     (default upshift-redis:<major.minor>)
#
# Debian's redis-server package is only the service around a symlink, /usr/bin/redis-server
# -> redis-check-rdb; the binary itself (which acts by the name it is called under) is in
# redis-tools, so that is what is installed when missing: no Redis service starts on the
# host. The container runs as `redis`, keeps an append-only file in /data, and listens on
# 6379 on its networks with no password (for tests and examples only).
set -euo pipefail

server=/usr/bin/redis-check-rdb
if [ ! -x "$server" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "no Redis server binary at $server; install it as root: apt-get install redis-tools" >&2
        exit 1
    fi
    echo "installing the Debian package redis-tools (the Redis server binary)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends redis-tools </dev/null >/dev/null \
        || { apt-get update -q </dev/null >/dev/null && apt-get install -y -q --no-install-recommends redis-tools </dev/null >/dev/null; }
fi
version=$(/usr/bin/redis-cli --version | grep -o '[0-9]*\.[0-9]*' | head -1)   # the same package
tag=${1:-upshift-redis:$version}
docker image inspect "$tag" >/dev/null 2>&1 && exit 0

fs=$(mktemp -d)
trap 'rm -rf "$fs"' EXIT
mkdir -p "$fs"/{etc,tmp,data,usr/bin}
cp "$server" "$fs/usr/bin/redis-server"
cp /usr/bin/redis-cli "$fs/usr/bin/redis-cli"
for lib in $( { for f in "$fs"/usr/bin/*; do ldd "$f" 2>/dev/null || true; done; } | grep -o '/[^ ]*' | sort -u); do
    [ -e "$fs$lib" ] || { mkdir -p "$fs$(dirname "$lib")"; cp -L "$lib" "$fs$lib"; }
done
printf 'root:x:0:0::/:/bin/sh\nredis:x:999:999::/data:/bin/sh\n' > "$fs/etc/passwd"
printf 'root:x:0:\nredis:x:999:\n' > "$fs/etc/group"
chmod 1777 "$fs/tmp"
chown 999:999 "$fs/data"
tar -C "$fs" -c . | docker import \
    --change 'ENTRYPOINT ["/usr/bin/redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", "--appendonly", "yes"]' \
    --change 'USER redis' \
    --change 'WORKDIR /data' \
    --change 'EXPOSE 6379' \
    - "$tag" >/dev/null
echo "built $tag from $server ($version)"
