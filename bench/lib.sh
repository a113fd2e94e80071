# Shared by the benchmarks: tool installs under bench/.tools and a throwaway PostgreSQL cluster.
# shellcheck shell=bash

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS=$BENCH_ROOT/.tools

pg_bindir() {
    local dir
    dir=$(pg_config --bindir 2>/dev/null || true)
    if [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
    echo "PostgreSQL server binaries not found: apt-get install -y postgresql" >&2
    return 1
}

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Starts a cluster in a temp dir on a free port; sets PGPORT and PG_DIR; stops it on exit.
start_postgres() {
    local bindir
    bindir=$(pg_bindir)
    PG_DIR=$(mktemp -d /tmp/upshift-bench-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_DIR"
    PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_postgres "$bindir/initdb" -D "$PG_DIR/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
    as_postgres "$bindir/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
        -o "-p $PGPORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null
    trap 'as_postgres "'"$bindir"'/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null; rm -rf "$PG_DIR"' EXIT
    export PGPORT PG_DIR PG_BINDIR=$bindir
}

install_python_tools() {
    if [ ! -x "$TOOLS/venv/bin/python" ]; then
        python3 -m venv "$TOOLS/venv"
    fi
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "$@"
}

install_node_tools() {
    mkdir -p "$TOOLS/node"
    (cd "$TOOLS/node" && npm install --silent --no-audit --no-fund "$@")
}
