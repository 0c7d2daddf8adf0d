"""Job repository: the state machine of a job, written with conditional updates.

Every function takes an open `Session` first and commits its own change, so a caller (API
request, worker thread) never leaves a half-applied transition behind. Owner-scoped reads take
the owner explicitly: another owner's job is indistinguishable from a missing one.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from hawada.lifecycle import TERMINAL_STATES
from hawada.store.db import db_now, rowcount_result
from hawada.store.models import Artifact, Job, JobEvent, utcnow

# A running job found with a lapsed lease is failed with this code once attempts run out.
LEASE_LOST = "lease_lost"
MAX_PAGE = 200


class InvalidCursor(ValueError):
    """A pagination cursor that this module did not produce."""


def new_id() -> str:
    """A fresh object id: 32 lowercase hex characters."""
    return uuid.uuid4().hex


def create_job(
    session: Session,
    *,
    owner: str,
    recipe: Mapping[str, Any],
    recipe_hash: str,
    weights_path: str | None,
    weights_sha256: str | None = None,
    model_id: str | None = None,
    dataset_path: str | None = None,
    heldout_path: str | None = None,
    idempotency_key: str | None = None,
    max_attempts: int = 3,
) -> Job:
    """Insert a queued job and return it (raises IntegrityError on a reused idempotency key)."""
    now = utcnow()
    job = Job(
        id=new_id(),
        owner=owner,
        status="queued",
        phase=None,
        progress=0.0,
        recipe=dict(recipe),
        recipe_hash=recipe_hash,
        model_id=model_id,
        weights_path=weights_path,
        weights_sha256=weights_sha256,
        dataset_path=dataset_path,
        heldout_path=heldout_path,
        created_at=now,
        updated_at=now,
        attempts=0,
        max_attempts=max_attempts,
        cancel_requested=False,
        idempotency_key=idempotency_key,
        event_seq=0,
    )
    session.add(job)
    session.commit()
    return job


# Transitions are bulk UPDATEs (they must be conditional), which bypass the identity map;
# reads therefore always refresh the rows they return.
_FRESH = {"populate_existing": True}


def get_job(session: Session, owner: str, job_id: str) -> Job | None:
    """The owner's job, or None (also for another owner's job)."""
    return session.scalar(
        select(Job).where(Job.id == job_id, Job.owner == owner).execution_options(**_FRESH)
    )


def load_job(session: Session, job_id: str) -> Job | None:
    """A job by id regardless of owner (worker side only; the API always scopes by owner)."""
    return session.get(Job, job_id, populate_existing=True)


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    """The owner's job submitted with `key`, if any."""
    return session.scalar(
        select(Job)
        .where(Job.owner == owner, Job.idempotency_key == key)
        .execution_options(**_FRESH)
    )


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor("cursor is not one returned by this API") from exc


def list_jobs(
    session: Session,
    owner: str,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the owner's jobs, newest first, and the cursor of the next page (or None)."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(Job).where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor:
        created, last_id = _decode_cursor(cursor)
        # Keyset pagination on (created_at desc, id desc): stable under concurrent inserts.
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query.execution_options(**_FRESH)))
    if len(rows) > limit:
        return rows[:limit], _encode_cursor(rows[limit - 1])
    return rows, None


def count_by_status(session: Session) -> dict[str, int]:
    """Number of jobs in each state, all owners (for the metrics gauge)."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: int(count) for status, count in rows}


def claim_job(session: Session, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Atomically take a queued job (or one whose lease lapsed) for `worker_id`.

    Exactly one of several concurrent claimers gets True. The claim counts an attempt.
    """
    now = db_now(session)
    claimable = or_(
        Job.status == "queued",
        and_(
            Job.status == "running",
            Job.lease_expires_at < now,
            Job.attempts < Job.max_attempts,
        ),
    )
    result = rowcount_result(
        session.execute(
            update(Job)
            .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False))
            .values(
                status="running",
                attempts=Job.attempts + 1,
                worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s),
                started_at=func.coalesce(Job.started_at, now),
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    )
    session.commit()
    return result.rowcount == 1


def renew_lease(session: Session, job_id: str, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False when the job is no longer ours or a cancel was requested.

    A cancelling job keeps its lease extended (so the reaper leaves the wind-down alone) but
    still answers False, which is the worker's signal to stop.
    """
    now = db_now(session)
    session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.worker_id == worker_id,
            Job.status.in_(("running", "cancelling")),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    row = session.execute(
        select(Job.status, Job.worker_id, Job.cancel_requested).where(Job.id == job_id)
    ).first()
    return (
        row is not None
        and row.status == "running"
        and row.worker_id == worker_id
        and not row.cancel_requested
    )


def set_progress(session: Session, job_id: str, phase: str | None, progress: float) -> None:
    """Record the current phase and overall progress (clamped to 0..1) of a live job."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(("running", "cancelling")))
        .values(phase=phase, progress=min(1.0, max(0.0, float(progress))), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def add_event(session: Session, job_id: str, kind: str, data: Mapping[str, Any]) -> int:
    """Append an event and return its sequence number (1, 2, ... per job).

    The counter lives on the job row and is bumped with UPDATE ... RETURNING, which takes the
    row (PostgreSQL) or database (SQLite) write lock, so concurrent writers never share a seq.
    """
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    session.add(JobEvent(job_id=job_id, seq=seq, created_at=utcnow(), kind=kind, data=dict(data)))
    session.commit()
    return int(seq)


def list_events(session: Session, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
    """Events of a job with seq > after, in order (owner checks are the caller's job)."""
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(max(1, min(limit, 10_000)))
        )
    )


def finish_job(
    session: Session,
    job_id: str,
    status: str,
    error: Mapping[str, str] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> bool:
    """Move a live job to a terminal state; False when it already was terminal.

    `error` is `{"code", "message"}` (failed/cancelled); `metrics` the report summary.
    """
    if status not in TERMINAL_STATES:
        raise ValueError(f"finish_job needs a terminal status, got {status!r}")
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
    }
    if status == "succeeded":
        values["progress"] = 1.0
    if error is not None:
        values["error_code"] = str(error.get("code", "error"))[:64]
        values["error_message"] = str(error.get("message", ""))
    if metrics is not None:
        values["metrics"] = dict(metrics)
    result = rowcount_result(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.not_in(TERMINAL_STATES))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    )
    session.commit()
    return result.rowcount == 1


def request_cancel(session: Session, owner: str, job_id: str) -> Job | None:
    """Cancel the owner's job: queued → cancelled now, running → cancelling (worker stops it).

    A terminal job is returned unchanged (the API answers 409); None when not found.
    """
    now = utcnow()
    owned = and_(Job.id == job_id, Job.owner == owner)
    session.execute(
        update(Job)
        .where(owned, Job.status == "queued")
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=now,
            updated_at=now,
            error_code="cancelled",
            error_message="cancelled before it started",
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(owned, Job.status == "running")
        .values(status="cancelling", cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return get_job(session, owner, job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """True once the job's owner asked to cancel it (or it vanished)."""
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return flag is None or bool(flag)


def requeue_expired(session: Session, now: datetime | None = None) -> list[str]:
    """Recover jobs whose worker stopped renewing its lease; returns the ids re-queued.

    running with attempts left → queued (the worker resumes from its checkpoint);
    running without → failed (`lease_lost`); cancelling → cancelled.
    """
    now = now or db_now(session)
    lapsed = and_(Job.lease_expires_at.is_not(None), Job.lease_expires_at < now)
    candidates = list(
        session.execute(
            select(Job.id, Job.status, Job.attempts, Job.max_attempts).where(
                Job.status.in_(("running", "cancelling")), lapsed
            )
        )
    )
    requeued: list[str] = []
    for job_id, status, attempts, max_attempts in candidates:
        # Each transition repeats the WHERE so a concurrent renew/claim wins cleanly.
        guard = and_(Job.id == job_id, Job.status == status, lapsed)
        if status == "cancelling":
            values: dict[str, Any] = {
                "status": "cancelled",
                "finished_at": now,
                "error_code": "cancelled",
                "error_message": "cancelled",
            }
        elif attempts < max_attempts:
            values = {"status": "queued", "phase": None}
        else:
            values = {
                "status": "failed",
                "finished_at": now,
                "error_code": LEASE_LOST,
                "error_message": f"worker lost after {attempts} attempt(s)",
            }
        values.update(worker_id=None, lease_expires_at=None, updated_at=now)
        result = rowcount_result(
            session.execute(
                update(Job)
                .where(guard)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        )
        session.commit()
        if result.rowcount == 1:
            kind = "requeued" if values["status"] == "queued" else "log"
            add_event(session, job_id, kind, {"message": f"lease lapsed; now {values['status']}"})
            if values["status"] == "queued":
                requeued.append(job_id)
    return requeued


def delete_job(session: Session, owner: str, job_id: str) -> bool:
    """Delete the owner's job with its events and artifact records; False when not found.

    One conditional DELETE (not running, not cancelling), so it cannot race a worker's claim:
    whichever commits first wins, and the other sees the outcome. Raises `JobBusy` while the
    job runs (cancel it first). Files are the caller's to remove.
    """
    busy = ("running", "cancelling")
    result = rowcount_result(
        session.execute(
            delete(Job)
            .where(Job.id == job_id, Job.owner == owner, Job.status.not_in(busy))
            .execution_options(synchronize_session=False)
        )
    )
    if result.rowcount != 1:
        session.rollback()
        job = get_job(session, owner, job_id)
        if job is None:
            return False
        raise JobBusy(job.status)
    # Explicit child deletes: SQLite enforces ON DELETE CASCADE only with the FK pragma.
    session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.commit()
    return True


def forget_idempotency_key(session: Session, job_id: str) -> None:
    """Free the job's Idempotency-Key (its enqueue failed: a retry must create a new job)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(idempotency_key=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def job_states(session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    """{job id: status} for those of `job_ids` that exist (any owner: the worker's view)."""
    rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(list(job_ids))))
    return {row.id: row.status for row in rows}


def event_heads(session: Session, job_ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
    """{job id: (last event seq, job ended)} for those of `job_ids` that exist: one query that
    tells followers of many jobs which have something new (an event's seq and the job row's
    counter are committed together)."""
    rows = session.execute(
        select(Job.id, Job.event_seq, Job.status).where(Job.id.in_(list(job_ids)))
    )
    return {row.id: (int(row.event_seq or 0), row.status in TERMINAL_STATES) for row in rows}


def count_active(session: Session, owner: str) -> int:
    """The owner's jobs that are queued, running or cancelling."""
    return int(
        session.scalar(
            select(func.count()).where(Job.owner == owner, Job.status.not_in(TERMINAL_STATES))
        )
        or 0
    )


class JobBusy(RuntimeError):
    """The job is running; it has to be cancelled before it can be deleted."""


def record_artifact(session: Session, job_id: str, name: str, size: int, sha256: str) -> None:
    """Register (or replace, on a retried attempt) an artifact file of a job."""
    existing = session.get(Artifact, (job_id, name))
    if existing is None:
        session.add(
            Artifact(job_id=job_id, name=name, size=size, sha256=sha256, created_at=utcnow())
        )
    else:
        existing.size, existing.sha256, existing.created_at = size, sha256, utcnow()
    session.commit()


def list_artifacts(session: Session, job_ids: Sequence[str]) -> dict[str, list[Artifact]]:
    """Artifacts per job id (one query for a whole page of jobs)."""
    out: dict[str, list[Artifact]] = {job_id: [] for job_id in job_ids}
    if not job_ids:
        return out
    for art in session.scalars(
        select(Artifact).where(Artifact.job_id.in_(list(job_ids))).order_by(Artifact.name)
    ):
        out[art.job_id].append(art)
    return out


def get_artifact(session: Session, job_id: str, name: str) -> Artifact | None:
    """The artifact record (job ownership is checked by the caller)."""
    return session.get(Artifact, (job_id, name), populate_existing=True)
