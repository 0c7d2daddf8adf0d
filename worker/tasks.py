"""Celery task definitions. The task body defers to ``worker.runner`` (which imports torch
lazily), so importing this module in the worker's parent process stays cheap and CUDA-free."""
from __future__ import annotations

from worker.app import TASK_NAME, celery_app


@celery_app.task(name=TASK_NAME)
def run_job(job_id: str) -> None:
    """Run one compression job end to end; the database records the outcome."""
    from worker.runner import execute

    execute(job_id)
