"""Per-device latency lookup tables cached in the database (shared by all workers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hawada.store.models import LatencyTableRow, utcnow


def get_latency_table(session: Session, key: str) -> bytes | None:
    """The stored table bytes for `key`, or None."""
    return session.scalar(select(LatencyTableRow.blob).where(LatencyTableRow.key == key))


def put_latency_table(
    session: Session, key: str, blob: bytes, device: str = "", meta: Mapping[str, Any] | None = None
) -> None:
    """Store (or replace) the table for `key`; two workers racing to insert is harmless."""
    row = session.get(LatencyTableRow, key)
    if row is None:
        session.add(
            LatencyTableRow(
                key=key, device=device, meta=dict(meta or {}), blob=blob, created_at=utcnow()
            )
        )
    else:
        row.blob, row.device, row.meta, row.created_at = blob, device, dict(meta or {}), utcnow()
    try:
        session.commit()
    except IntegrityError:
        # Another worker stored the same key first; both measured the same device, keep theirs.
        session.rollback()
