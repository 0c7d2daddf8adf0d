"""Alembic environment: online migrations only, on the connection `init_db` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from hawada.store.models import Base

# An arbitrary constant: PostgreSQL advisory lock id serialising concurrent upgrades
# (API and worker may start together and both call init_db).
_PG_MIGRATION_LOCK = 0x4A5741DA


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from hawada.settings import get_settings

    return get_settings().database_url


def _migrate(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs batch ALTERs
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run on the caller's connection if given, else on a fresh engine for the URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    from hawada.store.db import get_engine

    with get_engine(_database_url()).begin() as conn:
        _migrate(conn)


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
