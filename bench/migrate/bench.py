"""500 generated revisions applied by upshift, dbmate and alembic; prints one table.

Each revision creates a table, inserts 100 rows and creates an index: the same SQL for
every tool, written in each tool's own format. Every apply goes to a fresh database. The
`status` times are the median of several runs on the applied 500-revision history.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


ALEMBIC_ENV = '''
from alembic import context
from sqlalchemy import create_engine

url = context.config.get_main_option("sqlalchemy.url")
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
'''


def write_alembic(folder: Path, count: int, url: str) -> Path:
    versions = folder / "versions"
    versions.mkdir(parents=True)
    (folder / "env.py").write_text(ALEMBIC_ENV)
    (folder / "script.py.mako").write_text("")
    ini = folder / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {folder}\nsqlalchemy.url = {url}\n")
    for i in range(1, count + 1):
        down = f'"r{i - 1:04d}"' if i > 1 else "None"
        statements = "\n".join(f"    op.execute({sql!r})" for sql in revision_sql(i))
        (versions / f"r{i:04d}_bench.py").write_text(
            f'from alembic import op\n\nrevision = "r{i:04d}"\ndown_revision = {down}\n'
            f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n{statements}\n\n\n"
            f'def downgrade():\n    op.execute("DROP TABLE bench_{i:04d}")\n'
        )
    return ini


def timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return elapsed


def median_time(command: list[str], env: dict | None = None, runs: int = 7) -> float:
    return statistics.median(timed(command, env) for _ in range(runs))


class Postgres:
    def __init__(self, psql: str, port: int):
        self.psql = psql
        self.port = port
        self.counter = 0

    def fresh(self) -> str:
        self.counter += 1
        name = f"bench_{os.getpid()}_{self.counter}"
        subprocess.run(
            [self.psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
             "-q", "-c", f"CREATE DATABASE {name}"],
            check=True,
        )
        return name

    def count_tables(self, name: str) -> int:
        out = subprocess.run(
            [self.psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", name, "-tAc",
             "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_%'"],
            check=True, capture_output=True, text=True,
        )
        return int(out.stdout.strip())


def sqlite_tables(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name LIKE 'bench_%'"
        ).fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upshift", required=True)
    parser.add_argument("--dbmate", required=True)
    parser.add_argument("--alembic", required=True)
    parser.add_argument("--psql", required=True)
    parser.add_argument("--pg-port", type=int, required=True)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="upshift-bench-migrate-"))
    pg = Postgres(args.psql, args.pg_port)
    count = args.count
    write_sql_files(work / "upshift", count, "-- upshift:up", "-- upshift:down")
    write_sql_files(work / "dbmate", count, "-- migrate:up", "-- migrate:down")
    base_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "UPSHIFT_DATABASE_URL")}

    script = work / "all.sql"
    script.write_text("".join(";\n".join(revision_sql(i)) + ";\n" for i in range(1, count + 1)))

    rows = []  # (engine, what, tool, seconds)
    for engine in ("sqlite", "postgres"):
        def url_for(tool: str) -> tuple[str, str, str]:
            """(upshift/dbmate URL, SQLAlchemy URL, a check target) for a fresh database."""
            if engine == "sqlite":
                path = work / f"{tool}.db"
                return f"sqlite:{path}", f"sqlite:///{path}", str(path)
            name = pg.fresh()
            base = f"postgres://postgres@127.0.0.1:{args.pg_port}/{name}"
            return base + "?sslmode=disable", f"postgresql+psycopg2://postgres@127.0.0.1:{args.pg_port}/{name}", name

        def tables(target: str) -> int:
            return sqlite_tables(Path(target)) if engine == "sqlite" else pg.count_tables(target)

        # The floor: the same SQL in one transaction, no bookkeeping, no tool. Run once
        # unrecorded first, so that no tool pays the fresh cluster's one-time costs (new WAL
        # segments, cold caches).
        def floor_command(target: str) -> list[str]:
            if engine == "sqlite":
                return [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                        "c.executescript('BEGIN;' + open(sys.argv[2]).read() + 'COMMIT;')", target, str(script)]
            return [args.psql, "-h", "127.0.0.1", "-p", str(args.pg_port), "-U", "postgres", "-d", target,
                    "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", str(script)]

        timed(floor_command(url_for("warmup")[2]), base_env)
        _, _, target = url_for("floor")
        rows.append((engine, "apply", "floor", timed(floor_command(target), base_env)))
        assert tables(target) == count, "the floor run did not create every table"

        # upshift
        url, _, target = url_for("upshift")
        upshift = [args.upshift, "migrate", "--dir", str(work / "upshift"), "--database-url", url]
        rows.append((engine, "apply", "upshift", timed(upshift + ["up"], base_env)))
        assert tables(target) == count, "upshift did not create every table"
        rows.append((engine, "status", "upshift", median_time(upshift + ["status"], base_env)))

        # dbmate
        url, _, target = url_for("dbmate")
        dbmate = [args.dbmate, "--no-dump-schema", "--migrations-dir", str(work / "dbmate"), "--url", url]
        rows.append((engine, "apply", "dbmate", timed(dbmate + ["up"], base_env)))
        assert tables(target) == count, "dbmate did not create every table"
        rows.append((engine, "status", "dbmate", median_time(dbmate + ["status"], base_env)))

        # alembic
        _, sa_url, target = url_for("alembic")
        folder = work / f"alembic-{engine}"
        ini = write_alembic(folder, count, sa_url)
        alembic = [args.alembic, "-c", str(ini)]
        rows.append((engine, "apply", "alembic", timed(alembic + ["upgrade", "head"], base_env)))
        assert tables(target) == count, "alembic did not create every table"
        rows.append((engine, "status", "alembic", median_time(alembic + ["current"], base_env)))

    shutil.rmtree(work)
    print_table(rows, count)


def print_table(rows, count: int) -> None:
    times = {(e, w, t): s for e, w, t, s in rows}
    print(f"\n{count} revisions (CREATE TABLE + INSERT of 100 rows + CREATE INDEX each); apply = one run on a")
    print("fresh database, status = median of 7 runs on the applied history\n")
    print(f"| engine   | what   | {'upshift':>10} | {'dbmate':>10} | {'alembic':>10} | dbmate/upshift | alembic/upshift | {'floor':>10} | upshift/floor |")
    print("|----------|--------|------------|------------|------------|----------------|-----------------|------------|---------------|")
    for engine in ("sqlite", "postgres"):
        for what in ("apply", "status"):
            u, d, a = (times[(engine, what, tool)] for tool in ("upshift", "dbmate", "alembic"))
            cell = lambda s: f"{s * 1000:8.1f}ms"
            floor = times.get((engine, what, "floor"))
            floor_cells = f"{cell(floor):>10} | {u / floor:12.2f}x" if floor else f"{'':>10} | {'':>13}"
            print(f"| {engine:8} | {what:6} | {cell(u):>10} | {cell(d):>10} | {cell(a):>10} | "
                  f"{d / u:13.1f}x | {a / u:14.1f}x | {floor_cells} |")
    print("\nratios > 1 under dbmate/alembic mean upshift is faster; alembic's status is `alembic current`.")
    print("floor = the same SQL in one transaction with no tool and no bookkeeping (psql -1 -f, Python's sqlite3):")
    print("what the database itself needs, which no migration tool can beat.")


if __name__ == "__main__":
    main()
