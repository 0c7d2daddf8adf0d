"""Celery task definitions and worker lifecycle hooks.

The task body defers to ``hawada.worker.runner.execute`` which imports torch lazily; with the
prefork pool the task runs in a child process, so the parent (broker connection, reaper)
stays torch- and CUDA-free.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from hawada.store.broker import TASK_NAME
from hawada.worker.app import celery_app

_reaper: Any = None


@celery_app.task(name=TASK_NAME)
def run_job(job_id: str) -> None:
    """Run one compression job end to end; the database records the outcome."""
    from hawada.worker.runner import execute

    execute(job_id)


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked child must not share the parent's pooled DB sockets.
    from hawada.store.db import dispose_engines

    dispose_engines()


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    # Runs in the parent: re-queue jobs whose worker died, now and periodically.
    global _reaper
    from hawada.settings import get_settings
    from hawada.worker.runner import Reaper

    _reaper = Reaper(get_settings())
    _reaper.start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
