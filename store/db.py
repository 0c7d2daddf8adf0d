"""Engines, sessions and schema upgrades, identical on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 15_000

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits for the writer lock
    # instead of failing with "database is locked"; SQLite enforces FKs only when asked.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def get_engine(url: str) -> Engine:
    """The process-wide engine for `url` (created once per URL)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _create_engine(url)
            _engines[url] = engine
        return engine


# One pool shape for every backend; the API sizes its admission limit from it (api/admission.py).
POOL_SIZE = 10
MAX_OVERFLOW = 20
POOL_CAPACITY = POOL_SIZE + MAX_OVERFLOW


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    """A session factory bound to the engine of `url`."""
    engine = get_engine(url)
    with _lock:
        factory = _sessionmakers.get(url)
        if factory is None:
            # expire_on_commit=False: repository functions return rows used after commit.
            factory = sessionmaker(engine, expire_on_commit=False)
            _sessionmakers[url] = factory
        return factory


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session for one unit of work; repository functions commit, this rolls back leftovers."""
    session = get_sessionmaker(url)()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def init_db(url: str) -> None:
    """Bring the schema at `url` up to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with _migration_lock(url), get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    """Serialise upgrades of one SQLite file across processes (API and worker start together).

    pysqlite runs DDL outside transactions, so two first-time upgrades could interleave; a file
    lock beside the database prevents that. PostgreSQL uses an advisory lock in env.py instead.
    """
    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        yield
        return
    import fcntl

    lock_path = Path(parsed.database).with_name(Path(parsed.database).name + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dispose_engines() -> None:
    """Close every pooled connection and forget the engines (tests, forked processes)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _sessionmakers.clear()


def rowcount_result(result: Result[Any]) -> CursorResult[Any]:
    """The result of an UPDATE/DELETE, typed as what it is (a cursor result with `rowcount`)."""
    return cast(CursorResult[Any], result)


def db_now(session: Session) -> datetime:
    """The database server's current time (UTC, timezone-aware): the one clock for leases.

    Workers on several hosts compare lease expiry against this, never their own clocks.
    SQLite is a file on this host, so its clock is this host's.
    """
    if session.get_bind().dialect.name == "sqlite":
        return datetime.now(UTC)
    value = session.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
