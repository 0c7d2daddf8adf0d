"""Shared fixtures: temporary settings, a migrated database (SQLite and PostgreSQL), an API client.

PostgreSQL tests run in a schema of their own (dropped afterwards) on the server at
HAWADA_TEST_PG_URL and skip cleanly when it cannot be reached.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get("HAWADA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_TABLES = (
    "job_events",
    "artifacts",
    "jobs",
    "models",
    "api_keys",
    "latency_tables",
    "worker_heartbeats",
)


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL schema for this test session (skips if unreachable)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    schema = f"hawada_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc.orig}")
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    from hawada.store.db import init_db

    init_db(url)
    try:
        yield url
    finally:
        from hawada.store.db import dispose_engines

        dispose_engines()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or the session's PostgreSQL schema (truncated)."""
    from hawada.store.db import init_db

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'hawada.db'}"
        init_db(url)
        yield url
        from hawada.store.db import get_engine

        get_engine(url).dispose()  # release the file handles of this test's database
        return
    url = request.getfixturevalue("pg_schema_url")
    from sqlalchemy import text

    from hawada.store.db import get_engine

    with get_engine(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(_TABLES)} CASCADE"))
    yield url


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Any:
    """Settings for an isolated embedded instance under tmp_path on `db_url`."""
    from hawada.settings import Settings

    return Settings(
        var_dir=tmp_path / "var",
        database_url=db_url,
        artifacts_dir=tmp_path / "var" / "artifacts",
        lut_dir=tmp_path / "var" / "lut",
        broker_url="filesystem://",
        auth_required=False,
    )


class RecordingEnqueuer:
    """Stands in for Celery: remembers the job ids the API enqueued, in order."""

    def __init__(self) -> None:
        self.job_ids: list[str] = []

    def __call__(self, job_id: str) -> None:
        self.job_ids.append(job_id)


@pytest.fixture
def enqueued() -> RecordingEnqueuer:
    """The in-memory enqueuer the `client` fixture's app sends jobs to."""
    return RecordingEnqueuer()


@pytest.fixture
def client(settings: Any, enqueued: RecordingEnqueuer) -> Iterator[Any]:
    """A TestClient on an app built from `settings` (no auth) that enqueues into `enqueued`."""
    from fastapi.testclient import TestClient

    from hawada.api.main import create_app

    with TestClient(create_app(settings, enqueue=enqueued)) as test_client:
        yield test_client


# -- a real API over HTTP for the client and the CLI (tests/apiserver.py) --------------------
_CLIENT_ENV = (
    "HAWADA_DATABASE_URL",
    "HAWADA_ARTIFACTS_DIR",
    "HAWADA_BROKER_URL",
    "HAWADA_URL",
    "HAWADA_API_KEY",
    "HAWADA_LUT_DIR",
)


@pytest.fixture
def api_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Embedded settings under tmp_path, also visible to CLI code through the environment."""
    from hawada.settings import Settings, reset_settings

    for key in _CLIENT_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HAWADA_VAR_DIR", str(tmp_path / "var"))
    reset_settings()
    yield Settings(var_dir=tmp_path / "var")
    reset_settings()


@pytest.fixture
def api_server(api_settings: Any) -> Iterator[Any]:
    """`tests/apiserver.ApiServer`: the API on a loopback port with a fake worker."""
    from apiserver import ApiServer

    server = ApiServer(api_settings)
    yield server
    server.stop()
