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
_heartbeat: Any = None


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
    _die_with_parent()


def _die_with_parent() -> None:
    # If the Celery parent dies (even by SIGKILL) the job child dies too: its lease lapses and
    # the job resumes from its checkpoint on a live worker, instead of an orphan finishing it.
    import signal
    import sys

    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


@worker_ready.connect
def _start_reaper(**_: Any) -> None:
    # Runs in the parent: re-queue jobs whose worker died, now and periodically, and beat this
    # worker's heartbeat (/readyz needs one live worker).
    global _reaper, _heartbeat
    from hawada.settings import get_settings
    from hawada.worker.runner import Heartbeat, Reaper

    _reaper = Reaper(get_settings())
    _reaper.start()
    _heartbeat = Heartbeat(get_settings())
    _heartbeat.start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
    if _heartbeat is not None:
        _heartbeat.stop()
