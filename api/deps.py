"""Typed FastAPI dependencies: settings, DB session, artifact store, the calling owner."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from hawada.api.errors import ApiError
from hawada.api.schemas import JobPublic
from hawada.settings import Settings
from hawada.store import jobs as repo
from hawada.store.artifacts import ArtifactStore
from hawada.store.db import session_scope
from hawada.store.keys import resolve_key
from hawada.store.models import Job

LOCAL_OWNER = "local"
# Ids of jobs and models: anything else cannot exist, so it is a 404 without a query.
OBJECT_ID = re.compile(r"^[0-9a-f]{32}$")


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    """A session for the duration of one request."""
    with session_scope(settings.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


async def get_store(request: Request) -> ArtifactStore:
    """The artifact store of the app."""
    return request.app.state.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


#: Resolved keys are remembered this long: polling clients cost no key lookup per request.
#: A revoked key stops working within this many seconds.
KEY_CACHE_S = 5.0
_KEY_CACHE_MAX = 10_000


class _KeyCache:
    """sha256(key) -> (owner or None, expiry): a small TTL cache per process."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str | None, float]] = {}

    def get(self, digest: str) -> tuple[bool, str | None]:
        hit = self._entries.get(digest)
        if hit is None or hit[1] < time.monotonic():
            return False, None
        return True, hit[0]

    def put(self, digest: str, owner: str | None) -> None:
        if len(self._entries) >= _KEY_CACHE_MAX:
            self._entries.clear()  # bounded: a flood of random keys cannot grow it
        self._entries[digest] = (owner, time.monotonic() + KEY_CACHE_S)


_key_cache = _KeyCache()


def _resolve(database_url: str, token: str) -> str | None:
    # A short session of its own: async handlers must not hold a connection for the request.
    with session_scope(database_url) as session:
        return resolve_key(session, token)


async def get_owner(request: Request, settings: SettingsDep) -> str:
    """Who is calling: the owner of the bearer key, or "local" when auth is off.

    Async, so a request without auth costs no thread hop; a key is looked up in the database
    at most every `KEY_CACHE_S` seconds per process.
    """
    if not settings.auth_required:
        return LOCAL_OWNER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "missing bearer API key", headers=_UNAUTHORIZED)
    digest = hashlib.sha256(token.encode()).hexdigest()
    known, owner = _key_cache.get(digest)
    if not known:
        owner = await run_in_threadpool(_resolve, settings.database_url, token)
        _key_cache.put(digest, owner)
    if owner is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=_UNAUTHORIZED)
    return owner


CurrentOwner = Annotated[str, Depends(get_owner)]


def job_or_404(session: Session, owner: str, job_id: str) -> Job:
    """The owner's job or a 404 (also for malformed ids and other owners' jobs)."""
    job = repo.get_job(session, owner, job_id) if OBJECT_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


def public_job(session: Session, job: Job) -> JobPublic:
    """A job as the API shows it, with its artifacts (only a succeeded job has any)."""
    if job.status != "succeeded":
        return JobPublic.build(job, [])
    return JobPublic.build(job, repo.list_artifacts(session, [job.id])[job.id])
