"""A `hawada.core.lut.LutCache` backed by the database, so every worker on the same kind of device
reuses one measured latency table instead of profiling again."""

from __future__ import annotations

from hawada.store.db import session_scope
from hawada.store.latency_tables import get_latency_table, put_latency_table


class StoreLutCache:
    """``get(key) -> bytes | None`` / ``put(key, bytes)`` over the ``latency_tables`` table."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def get(self, key: str) -> bytes | None:
        """The cached table bytes for ``key`` (None when not measured yet)."""
        with session_scope(self.database_url) as session:
            blob = get_latency_table(session, key)
        return None if blob is None else bytes(blob)

    def put(self, key: str, blob: bytes) -> None:
        """Store a freshly measured table; a concurrent insert of the same key is harmless."""
        # The key already encodes the device and shapes (hawada.core.lut): no separate metadata.
        with session_scope(self.database_url) as session:
            put_latency_table(session, key, bytes(blob))
