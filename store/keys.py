"""API keys: handed out once in plaintext (`hwd_…`), stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hawada.store.db import rowcount_result
from hawada.store.models import ApiKey, utcnow

KEY_PREFIX = "hwd_"


def hash_key(plaintext: str) -> str:
    """sha256 hex of a key. Keys are 256-bit random, so a fast hash is enough (no brute force)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_key(session: Session, owner: str, name: str = "default") -> str:
    """Create a key for `owner` and return its plaintext; it cannot be recovered later."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=secrets.token_hex(16),
            owner=owner,
            name=name,
            key_hash=hash_key(plaintext),
            prefix=plaintext[: len(KEY_PREFIX) + 6],
            created_at=utcnow(),
        )
    )
    session.commit()
    return plaintext


def resolve_key(session: Session, plaintext: str) -> str | None:
    """The owner of a live (not revoked) key, or None."""
    if not plaintext.startswith(KEY_PREFIX):
        return None
    return session.scalar(
        select(ApiKey.owner).where(
            ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)
        )
    )


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    """Keys (hash and prefix only), optionally of one owner, oldest first."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))


def revoke_key(session: Session, key_id_or_prefix: str) -> bool:
    """Revoke a key by its id or its displayed prefix; False when no live key matched."""
    result = rowcount_result(
        session.execute(
            update(ApiKey)
            .where(
                (ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix),
                ApiKey.revoked_at.is_(None),
            )
            .values(revoked_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    )
    session.commit()
    return result.rowcount > 0
