"""Handing job ids to the worker: a bare Celery producer that sends the task by name.

The API never imports the worker (nor torch): it needs only the task name and the broker
configuration, both from `hawada.store.broker`, which the worker uses as well.
"""

from __future__ import annotations

import threading
from typing import Protocol

from celery import Celery

from hawada.settings import Settings
from hawada.store.broker import TASK_NAME, celery_config, ensure_broker_folders


class Enqueuer(Protocol):
    """Anything that takes a job id and arranges for a worker to run it."""

    def __call__(self, job_id: str) -> None: ...


class CeleryEnqueuer:
    """Sends `hawada.run_job(job_id)` through the Celery broker of `settings`.

    The producer is built on first use, so creating the API (tests, /healthz) needs no broker
    and touches no folder.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def _producer(self) -> Celery:
        with self._lock:
            if self._app is None:
                ensure_broker_folders(self._settings)
                app = Celery("hawada-api", set_as_current=False)
                app.conf.update(celery_config(self._settings))
                self._app = app
            return self._app

    def __call__(self, job_id: str) -> None:
        self._producer().send_task(TASK_NAME, args=[job_id])
