"""Worker heartbeats: each live worker's row, beaten on the database clock, read by /readyz.

A worker (its Celery parent) beats every few seconds; the API counts workers whose beat is
younger than the timeout. A worker that stops cleanly removes its row; a killed one just ages
out.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from hawada.store.db import db_now
from hawada.store.models import WorkerHeartbeat


def beat(session: Session, worker_id: str) -> None:
    """Record that `worker_id` is alive now (database time)."""
    now = db_now(session)
    updated = session.execute(
        update(WorkerHeartbeat)
        .where(WorkerHeartbeat.worker_id == worker_id)
        .values(beat_at=now)
        .execution_options(synchronize_session=False)
    )
    if not getattr(updated, "rowcount", 0):
        session.add(WorkerHeartbeat(worker_id=worker_id, beat_at=now))
    session.commit()


def forget(session: Session, worker_id: str) -> None:
    """Remove a worker's row (it is stopping)."""
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker_id == worker_id))
    session.commit()


def live_workers(session: Session, timeout_s: float, host: str | None = None) -> int:
    """How many workers (on `host`, if given) beat within the last `timeout_s` seconds."""
    since = db_now(session) - timedelta(seconds=timeout_s)
    query = select(func.count()).where(WorkerHeartbeat.beat_at >= since)
    if host is not None:  # worker ids are "<host>:<pid>"
        query = query.where(WorkerHeartbeat.worker_id.startswith(f"{host}:", autoescape=True))
    return int(session.scalar(query) or 0)
