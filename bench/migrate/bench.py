"""500 generated revisions applied by upshift, dbmate, alembic and the floor; prints tables.

Each revision creates a table, inserts 100 rows and creates an index: the same SQL for
every tool, written in each tool's own format. Every apply goes to a fresh database.

The tools run interleaved: each round applies the revisions once with every tool, in an
order that rotates from round to round, so a slow spell of the disk lands on all of them.
Each figure is the median, min and max of the rounds; the ratio to dbmate is taken within
each round (dbmate's time / the tool's, so > 1 means faster than dbmate), then the median,
min and max of those. PostgreSQL runs once with fsync on and once with fsync off (the
default; `--fsync on` or `--fsync off` for one), switched with ALTER SYSTEM and a reload.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ["upshift", "dbmate", "alembic", "floor"]


def revision_sql(i: int) -> list[str]:
    rows = ", ".join(f"({n}, 'value {i} {n}')" for n in range(1, 101))
    return [
        f"CREATE TABLE bench_{i:04d} (id integer PRIMARY KEY, v text NOT NULL)",
        f"INSERT INTO bench_{i:04d} (id, v) VALUES {rows}",
        f"CREATE INDEX bench_{i:04d}_v ON bench_{i:04d} (v)",
    ]


def write_sql_files(folder: Path, count: int, up_marker: str, down_marker: str) -> None:
    """One file per revision, in upshift's or dbmate's format (they differ in the markers)."""
    folder.mkdir(parents=True)
    for i in range(1, count + 1):
        up = ";\n".join(revision_sql(i)) + ";\n"
        text = f"{up_marker}\n{up}{down_marker}\nDROP TABLE bench_{i:04d};\n"
        (folder / f"{20260000000000 + i}_bench_{i:04d}.sql").write_text(text)


# Alembic's own env.py shape: with transaction_per_migration left at its default (False),
# every revision of the run goes in one transaction on PostgreSQL.
ALEMBIC_ENV = '''
import os
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(os.environ["BENCH_ALEMBIC_URL"])
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
'''


def write_alembic(folder: Path, count: int) -> Path:
    """One revision module per migration; the database URL comes from the environment."""
    versions = folder / "versions"
    versions.mkdir(parents=True)
    (folder / "env.py").write_text(ALEMBIC_ENV)
    (folder / "script.py.mako").write_text("")
    ini = folder / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {folder}\n")
    for i in range(1, count + 1):
        down = f'"r{i - 1:04d}"' if i > 1 else "None"
        statements = "\n".join(f"    op.execute({sql!r})" for sql in revision_sql(i))
        (versions / f"r{i:04d}_bench.py").write_text(
            f'from alembic import op\n\nrevision = "r{i:04d}"\ndown_revision = {down}\n'
            f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n{statements}\n\n\n"
            f'def downgrade():\n    op.execute("DROP TABLE bench_{i:04d}")\n'
        )
    return ini


# CPU time (user + system) each apply's tool process spent itself, by tool, in seconds:
# what the tool costs, apart from the database's work and the WAL flushes it waits on.
CPU: dict = {}


def timed(command: list[str], env: dict, tool: str | None = None) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    if tool:
        CPU.setdefault(tool, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return elapsed


class Postgres:
    def __init__(self, psql: str, port: int):
        self.psql = psql
        self.port = port
        self.counter = 0

    def run(self, database: str, sql: str) -> str:
        out = subprocess.run(
            [self.psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-qtAX", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def fresh(self) -> str:
        self.counter += 1
        name = f"bench_{os.getpid()}_{self.counter}"
        self.run("postgres", f"CREATE DATABASE {name}")
        return name

    def drop(self, name: str) -> None:
        self.run("postgres", f"DROP DATABASE {name}")

    def count_tables(self, name: str) -> int:
        return int(self.run(name, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_%'"))

    def set_fsync(self, on: bool) -> None:
        """Switches fsync (a reload setting) and waits until new sessions see it; a
        checkpoint first, so no run pays for the writes of the mode before."""
        self.run("postgres", "CHECKPOINT")
        self.run("postgres", f"ALTER SYSTEM SET fsync = {'on' if on else 'off'}")
        self.run("postgres", "SELECT pg_reload_conf()")
        wanted = "on" if on else "off"
        deadline = time.monotonic() + 10
        while self.run("postgres", "SHOW fsync") != wanted:
            if time.monotonic() > deadline:
                sys.exit(f"fsync did not become {wanted} after a reload")
            time.sleep(0.1)


def sqlite_tables(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'bench_%'"
        ).fetchone()[0]


class Bench:
    def __init__(self, args, work: Path, pg: Postgres):
        self.args = args
        self.work = work
        self.pg = pg
        self.count = args.count
        self.env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "UPSHIFT_DATABASE_URL")}
        write_sql_files(work / "upshift", self.count, "-- upshift:up", "-- upshift:down")
        write_sql_files(work / "dbmate", self.count, "-- migrate:up", "-- migrate:down")
        self.alembic_ini = write_alembic(work / "alembic", self.count)
        self.script = work / "all.sql"
        self.script.write_text("".join(";\n".join(revision_sql(i)) + ";\n" for i in range(1, self.count + 1)))
        self.sqlite_files = 0

    def database(self, engine: str) -> dict:
        """A fresh database: its URLs for each tool and how to check and remove it."""
        if engine == "sqlite":
            self.sqlite_files += 1
            path = self.work / f"db{self.sqlite_files}.sqlite"
            return {"url": f"sqlite:{path}", "sqlalchemy": f"sqlite:///{path}", "target": str(path),
                    "tables": lambda: sqlite_tables(path), "drop": lambda: path.unlink(missing_ok=True)}
        name = self.pg.fresh()
        port = self.args.pg_port
        return {"url": f"postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable",
                "sqlalchemy": f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}?sslmode=disable",
                "target": name, "tables": lambda: self.pg.count_tables(name), "drop": lambda: self.pg.drop(name)}

    def command(self, tool: str, engine: str, db: dict, what: str) -> tuple[list[str], dict]:
        env = self.env
        if tool in ("upshift", "baseline"):
            binary = self.args.upshift if tool == "upshift" else self.args.baseline
            base = [binary, "migrate", "--dir", str(self.work / "upshift"), "--database-url", db["url"]]
            return base + [what], env
        if tool == "dbmate":
            base = [self.args.dbmate, "--no-dump-schema", "--migrations-dir", str(self.work / "dbmate"),
                    "--url", db["url"]]
            return base + [what], env
        if tool == "alembic":
            env = dict(env, BENCH_ALEMBIC_URL=db["sqlalchemy"])
            return [self.args.alembic, "-c", str(self.alembic_ini)] + (
                ["upgrade", "head"] if what == "up" else ["current"]), env
        if engine == "sqlite":
            return [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                    "c.executescript('BEGIN;' + open(sys.argv[2]).read() + 'COMMIT;')", db["target"],
                    str(self.script)], env
        return [self.args.psql, "-h", "127.0.0.1", "-p", str(self.args.pg_port), "-U", "postgres", "-d",
                db["target"], "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", str(self.script)], env

    def apply(self, tool: str, engine: str, keep: bool = False):
        db = self.database(engine)
        command, env = self.command(tool, engine, db, "up")
        seconds = timed(command, env, tool)
        if db["tables"]() != self.count:
            sys.exit(f"{tool} did not create every table on {engine}")
        if keep:
            return seconds, db
        db["drop"]()
        return seconds, None

    def rounds(self, engine: str) -> tuple[dict, dict, dict]:
        """Interleaved apply rounds; returns the times by tool and the status times (the
        median of 7 interleaved runs of each tool's status on the last round's history)."""
        # Unrecorded, so that no tool pays the one-time costs (new WAL segments, cold caches).
        self.apply("floor", engine)
        CPU.clear()
        times = {tool: [] for tool in TOOLS}
        kept = {}
        for r in range(self.args.runs):
            order = TOOLS[r % len(TOOLS):] + TOOLS[:r % len(TOOLS)]
            last = r == self.args.runs - 1
            for tool in order:
                seconds, db = self.apply(tool, engine, keep=last and tool != "floor")
                times[tool].append(seconds)
                if db:
                    kept[tool] = db
            print(f"  {engine} round {r + 1}: " + ", ".join(f"{t} {times[t][-1]:.2f}s" for t in TOOLS),
                  file=sys.stderr)
        status = {tool: [] for tool in TOOLS if tool in kept}
        for _ in range(7):
            for tool in status:
                command, env = self.command(tool, engine, kept[tool], "status")
                status[tool].append(timed(command, env))
        for db in kept.values():
            db["drop"]()
        return times, status, dict(CPU)


def spread(values: list[float], unit: str) -> str:
    scale, fmt = (1000, "{:.0f}") if unit == "ms" else (1, "{:.2f}")
    med, low, high = (fmt.format(v * scale) for v in (statistics.median(values), min(values), max(values)))
    return f"{med} ({low}-{high})"


def print_apply(title: str, times: dict, runs: int, cpu: dict) -> None:
    print(f"\n{title}: apply, seconds, median (min-max) of {runs} interleaved rounds; the tool's own CPU "
          "(its process's user + system time)\n")
    print("| tool     | seconds              | vs dbmate (per round)    | tool's own CPU, s    |")
    print("|----------|----------------------|--------------------------|----------------------|")
    for tool in TOOLS:
        ratios = [d / t for d, t in zip(times["dbmate"], times[tool])]
        ratio = "" if tool == "dbmate" else (
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        print(f"| {tool:8} | {spread(times[tool], 's'):20} | {ratio:24} | {spread(cpu[tool], 's'):20} |")


def print_status(title: str, status: dict) -> None:
    print(f"\n{title}: status on the applied history, ms, median (min-max) of 7 interleaved runs\n")
    print("| tool     | ms                   |")
    print("|----------|----------------------|")
    for tool, values in status.items():
        print(f"| {tool:8} | {spread(values, 'ms'):20} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upshift", required=True)
    parser.add_argument("--dbmate", required=True)
    parser.add_argument("--alembic", required=True)
    parser.add_argument("--psql", required=True)
    parser.add_argument("--pg-port", type=int, required=True)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--fsync", choices=("both", "on", "off"), default="both",
                        help="PostgreSQL's fsync for the runs (default both: on, then off)")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--baseline", help="another upshift binary (an older build) to run as one more tool")
    args = parser.parse_args()
    if args.baseline:
        TOOLS.insert(1, "baseline")

    work = Path(tempfile.mkdtemp(prefix="upshift-bench-migrate-"))
    pg = Postgres(args.psql, args.pg_port)
    bench = Bench(args, work, pg)
    version = subprocess.run([args.upshift, "--version"], capture_output=True, text=True).stdout.strip()
    server = pg.run("postgres", "SHOW server_version")
    results = []
    for on in {"both": (True, False), "on": (True,), "off": (False,)}[args.fsync]:
        pg.set_fsync(on)
        title = f"PostgreSQL {server}, fsync={'on' if on else 'off'}"
        print(f"{title}:", file=sys.stderr)
        results.append((title, *bench.rounds("postgres")))
    if not args.no_sqlite:
        print("SQLite:", file=sys.stderr)
        results.append(("SQLite (synchronous=FULL, its default)", *bench.rounds("sqlite")))
    shutil.rmtree(work)

    print(f"\n{version}: {args.count} revisions (CREATE TABLE + INSERT of 100 rows + CREATE INDEX each),")
    print("each apply on a fresh database; the tools interleaved, their order rotating each round.")
    print("upshift and dbmate commit once per revision; alembic (its default) and the floor commit once")
    print("for all of them. floor = the same SQL in one transaction, no tool, no bookkeeping (psql -1 -f,")
    print("Python's sqlite3). vs dbmate = dbmate's time / the tool's in the same round (> 1: faster).")
    if args.baseline:
        print(f"baseline = {args.baseline}, another upshift build, run as one more tool.")
    for title, times, status, cpu in results:
        print_apply(title, times, args.runs, cpu)
        print_status(title, status)


if __name__ == "__main__":
    main()
