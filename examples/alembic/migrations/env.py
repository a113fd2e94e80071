"""Alembic's environment: the database is the one upshift names in DATABASE_URL."""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)


def database_url():
    """DATABASE_URL in SQLAlchemy's form (postgres:// and sqlite:PATH are upshift's)."""
    url = os.environ["DATABASE_URL"]
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://"):]
    if url.startswith("sqlite:") and not url.startswith("sqlite:///"):
        return "sqlite:///" + url[len("sqlite:"):].removeprefix("//")
    return url


def run_migrations_offline():
    context.configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
