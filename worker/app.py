"""The Celery application shared by the API (to enqueue) and the worker (to run jobs).

No torch here: the API imports this module to call ``send_task`` and must stay torch-free.
The database owns job state, so there is no result backend; the broker only carries
"run job <id>" messages and a lost message is recovered by the lease reaper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from hawada.core.config import Settings, get_settings

TASK_NAME = "hawada.run_job"


def _filesystem_options(var_dir: Path) -> dict[str, Any]:
    """Transport options for the embedded ``filesystem://`` broker, folders created."""
    queue = var_dir / "broker" / "queue"
    processed = var_dir / "broker" / "processed"
    # kombu keeps its exchange table in `control_folder`; left unset it writes ./control in
    # whatever folder the process happens to run from.
    control = var_dir / "broker" / "control"
    for folder in (queue, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    # Producer and consumer share one folder: the API writes messages the worker reads.
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "store_processed": False,
    }


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for ``settings`` (broker, reliability and limits)."""
    app = Celery("hawada", broker=settings.broker_url, include=["hawada.worker.tasks"])
    transport_options: dict[str, Any] = {
        # A redelivery must not race a live job: keep it above the job's hard limit.
        "visibility_timeout": int(settings.job_time_limit_s) + 3600,
    }
    if str(settings.broker_url).startswith("filesystem://"):
        # Absolute, so an API and a worker started from different folders still meet.
        transport_options.update(_filesystem_options(Path(settings.var_dir).resolve()))
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # A job is acknowledged only when it ends, and re-delivered if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=int(settings.job_time_limit_s),
        task_soft_time_limit=max(1, int(settings.job_time_limit_s) - 60),
        task_default_queue="hawada",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


celery_app = make_celery(get_settings())
