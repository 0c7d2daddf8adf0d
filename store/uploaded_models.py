"""Uploaded weights registered once and reused by many jobs (`/v1/models`)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from hawada.store.models import Model, utcnow


def create_model(
    session: Session,
    *,
    model_id: str,
    owner: str,
    filename: str,
    format: str,
    size: int,
    sha256: str,
    path: str,
    arch: str | None = None,
) -> Model:
    """Register an uploaded weights file already stored at `path`."""
    row = Model(
        id=model_id,
        owner=owner,
        filename=filename,
        format=format,
        size=size,
        sha256=sha256,
        path=path,
        arch=arch,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return row


def get_model(session: Session, owner: str, model_id: str) -> Model | None:
    """The owner's model, or None (also for another owner's)."""
    return session.scalar(select(Model).where(Model.id == model_id, Model.owner == owner))
