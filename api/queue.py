"""Handing job ids to the worker. The API never imports the task module (or torch)."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from hawada.core.config import Settings

TASK_NAME = "hawada.run_job"


class Enqueuer(Protocol):
    """Anything that takes a job id and arranges for a worker to run it."""

    def __call__(self, job_id: str) -> None: ...


class CeleryEnqueuer:
    """Sends `hawada.run_job(job_id)` through the Celery broker of `settings`.

    The Celery app is built on first use, so creating the API (tests, /healthz) needs no broker.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Any = None
        self._lock = threading.Lock()

    def _celery(self) -> Any:
        with self._lock:
            if self._app is None:
                from hawada.worker.app import make_celery  # celery only; worker.app imports no torch

                self._app = make_celery(self._settings)
            return self._app

    def __call__(self, job_id: str) -> None:
        self._celery().send_task(TASK_NAME, args=[job_id])
