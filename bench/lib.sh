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

# Starts a cluster in a temp dir on a free port; sets PGPORT and PG_DIR; stops it when the
# script exits, however that happens: success, failure, Ctrl-C or SIGTERM (see run_child).
start_postgres() {
    PG_BINDIR=$(pg_bindir)
    PG_DIR=$(mktemp -d /tmp/upshift-bench-pg.XXXXXX)
    trap stop_postgres EXIT
    trap 'on_signal INT' INT
    trap 'on_signal TERM' TERM
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_DIR"
    PGPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    as_postgres "$PG_BINDIR/initdb" -D "$PG_DIR/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
    as_postgres "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
        -o "-p $PGPORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null
    export PGPORT PG_DIR PG_BINDIR
}

# Stops the cluster and removes its temp dir. Runs from traps, so it never fails: under
# `set -e` a failing pg_ctl would end the trap before the rm and change the exit code.
stop_postgres() {
    [ -n "${PG_DIR:-}" ] || return 0
    if [ -e "$PG_DIR/data/postmaster.pid" ]; then
        as_postgres "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null || true
    fi
    rm -rf "$PG_DIR" || true
    PG_DIR=
}

# Runs "$@" as a child and returns its exit status. Never `exec` the last command of a script
# that set an EXIT trap: exec replaces the shell and the trap never runs. The child is
# started asynchronously so that a signal sent to the script alone interrupts the `wait`
# (see on_signal); undone are the two things bash does to an asynchronous command, ignoring
# SIGINT and SIGQUIT and reading /dev/null, so it runs as a foreground command would.
BENCH_CHILD=
run_child() {
    local status=0
    (trap - INT QUIT; exec "$@") <&0 &
    BENCH_CHILD=$!
    wait "$BENCH_CHILD" || status=$?
    BENCH_CHILD=
    return "$status"
}

# The INT and TERM traps. Waits for run_child's child to stop: a Ctrl-C has reached it with
# the script; a signal sent to the script alone is passed on to it after a second. Then exits
# with the child's own failure code, or else by the same signal (what callers look for), and
# the EXIT trap cleans up.
on_signal() {
    local sig=$1 status=0
    if [ -n "$BENCH_CHILD" ]; then
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$BENCH_CHILD" 2>/dev/null || break
            sleep 0.1 || true
        done
        kill -s "$sig" "$BENCH_CHILD" 2>/dev/null || true
        wait "$BENCH_CHILD" || status=$?
        BENCH_CHILD=
    fi
    if [ "$status" -ge 1 ] && [ "$status" -le 128 ]; then exit "$status"; fi
    trap - "$sig"
    kill -s "$sig" $$
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
