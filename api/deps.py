"""Typed FastAPI dependencies: settings, DB session, artifact store, the calling owner."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

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


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    """A session for the duration of one request."""
    with session_scope(settings.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def get_store(request: Request) -> ArtifactStore:
    """The artifact store of the app."""
    return request.app.state.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def get_owner(request: Request, settings: SettingsDep) -> str:
    """Who is calling: the owner of the bearer key, or "local" when auth is off."""
    if not settings.auth_required:
        return LOCAL_OWNER
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer API key", headers=_UNAUTHORIZED)
    # A short session of its own: async handlers must not hold a connection for the request.
    with session_scope(settings.database_url) as session:
        owner = resolve_key(session, token.strip())
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
    """A job as the API shows it, with its artifacts."""
    return JobPublic.build(job, repo.list_artifacts(session, [job.id])[job.id])
