#!/usr/bin/env bash
# A PostgreSQL image made from this machine's own server binaries (Debian's postgresql
# package), for Compose stacks in tests and examples: no registry needed. Idempotent: an
# image with the tag already there is kept.
#
#   ci/engines/postgres-image.sh [TAG]     (default upshift-postgres:<major>)
#
# The container runs as `postgres`, initialises /var/lib/postgresql/data on first start
# (trust authentication: for tests and examples only), and listens on 5432 on its networks.
set -euo pipefail

bin=$(dirname "$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V | tail -1)")
[ -x "$bin/postgres" ] || { echo "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)" >&2; exit 1; }
root=$(dirname "$bin")
major=$(basename "$root")
tag=${1:-upshift-postgres:$major}
docker image inspect "$tag" >/dev/null 2>&1 && exit 0

fs=$(mktemp -d)
trap 'rm -rf "$fs"' EXIT
mkdir -p "$fs"/{bin,etc,tmp,var/lib/postgresql,var/run/postgresql,usr/share/postgresql,usr/share/zoneinfo/Etc} "$fs$root"/{bin,lib}
for b in postgres initdb pg_isready; do cp "$bin/$b" "$fs$bin/"; done
cp "$root"/lib/*.so "$fs$root/lib/"
rm -f "$fs$root"/lib/llvmjit*.so                    # the JIT drags in LLVM (100 MB); not needed
cp -r "/usr/share/postgresql/$major" "$fs/usr/share/postgresql/"
cp /usr/share/zoneinfo/UTC "$fs/usr/share/zoneinfo/UTC"
cp /usr/share/zoneinfo/Etc/UTC "$fs/usr/share/zoneinfo/Etc/UTC"
busybox=$(command -v busybox) || { echo "busybox is needed (apt-get install busybox-static)" >&2; exit 1; }
cp "$busybox" "$fs/bin/busybox"
ln -s busybox "$fs/bin/sh"
for lib in $( { for f in "$fs$bin"/* "$fs$root"/lib/*.so "$fs/bin/busybox"; do ldd "$f" 2>/dev/null || true; done; } | grep -o '/[^ ]*' | sort -u); do
    [ -e "$fs$lib" ] || { mkdir -p "$fs$(dirname "$lib")"; cp -L "$lib" "$fs$lib"; }
done
printf 'root:x:0:0::/:/bin/sh\npostgres:x:999:999::/var/lib/postgresql:/bin/sh\n' > "$fs/etc/passwd"
printf 'root:x:0:\npostgres:x:999:\n' > "$fs/etc/group"
cat > "$fs/bin/entrypoint" <<SCRIPT
#!/bin/sh
set -e
D=/var/lib/postgresql/data
if [ ! -s "\$D/PG_VERSION" ]; then
    initdb -D "\$D" -U postgres --auth=trust --encoding=UTF8 --locale=C >/dev/null
    echo "listen_addresses = '*'" >> "\$D/postgresql.conf"
    echo "host all all 0.0.0.0/0 trust" >> "\$D/pg_hba.conf"
fi
exec postgres -D "\$D" -c unix_socket_directories=/var/run/postgresql
SCRIPT
chmod 0755 "$fs/bin/entrypoint"
chmod 1777 "$fs/tmp"
chown -R 999:999 "$fs/var/lib/postgresql" "$fs/var/run/postgresql"
tar -C "$fs" -c . | docker import \
    --change 'ENTRYPOINT ["/bin/entrypoint"]' \
    --change 'USER postgres' \
    --change "ENV TZ=UTC PATH=$bin:/bin" \
    --change 'EXPOSE 5432' \
    - "$tag" >/dev/null
echo "built $tag from $bin"
