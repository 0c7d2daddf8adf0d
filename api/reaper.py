"""The API's own lease reaper: lapsed jobs are re-queued even when no worker process is alive.

Every worker's parent reaps too (`hawada.worker.runner.Reaper`); the API runs the same database
transition (`store.jobs.requeue_expired`, guarded so each job moves once whoever runs it) and
sends the re-queued jobs through its own enqueuer. So a job whose worker died is re-queued
while the restarted (or any other) worker comes up, and no single process is the only reaper.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from hawada.settings import Settings
from hawada.store import jobs
from hawada.store.db import session_scope

log = logging.getLogger("hawada.api")


def reap_and_send(settings: Settings, send: Callable[[str], Any]) -> list[str]:
    """One round: re-queue lapsed jobs, send each re-queued one; returns their ids."""
    with session_scope(settings.database_url) as session:
        requeued = jobs.requeue_expired(session)
    for job_id in requeued:
        try:
            send(job_id)
        except Exception:  # the worker's reaper or the next round cannot resend: log loudly
            log.exception("re-queued job %s could not be sent to the queue", job_id)
    if requeued:
        log.warning("re-queued %d job(s) with lapsed leases: %s", len(requeued), requeued)
    return requeued


@asynccontextmanager
async def reaper_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run `reap_and_send` every max(5 s, lease_s / 2) in a thread while the app is up."""
    settings: Settings = app.state.settings
    halt = threading.Event()

    def loop() -> None:
        while not halt.wait(max(5.0, settings.lease_s / 2.0)):
            try:
                reap_and_send(settings, app.state.enqueue)
            except Exception:
                log.exception("API reaper round failed")

    thread = threading.Thread(target=loop, name="hawada-api-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        halt.set()
