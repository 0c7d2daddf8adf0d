"""The job queue's wire contract, shared by the API (producer) and the worker (consumer).

The database owns job state; the broker only carries "run job <id>" messages. Both sides build
their Celery configuration here so they agree on the task name, the queue, the serializer and,
for the embedded `filesystem://` transport, the folders messages are exchanged through.
Nothing here runs at import time: folders are created by `ensure_broker_folders`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hawada.settings import Settings

#: The one task the worker runs: `hawada.run_job(job_id)`.
TASK_NAME = "hawada.run_job"
QUEUE = "hawada"


def _is_filesystem(settings: Settings) -> bool:
    return str(settings.broker_url).startswith("filesystem://")


def broker_folders(settings: Settings) -> dict[str, Path]:
    """Folders of the embedded `filesystem://` transport (absolute; empty for other brokers).

    Absolute, so an API and a worker started from different folders still meet.
    """
    if not _is_filesystem(settings):
        return {}
    root = Path(settings.var_dir).resolve() / "broker"
    return {
        # Producer and consumer share one folder: the API writes messages the worker reads.
        "queue": Path(settings.broker_dir).resolve(),
        "processed": root / "processed",
        # kombu keeps its exchange table in `control_folder`; left unset it writes ./control in
        # whatever folder the process happens to run from.
        "control": root / "control",
    }


def ensure_broker_folders(settings: Settings) -> None:
    """Create the `filesystem://` transport's folders (no-op for other brokers)."""
    for folder in broker_folders(settings).values():
        folder.mkdir(parents=True, exist_ok=True)


def transport_options(settings: Settings) -> dict[str, Any]:
    """Celery `broker_transport_options` for `settings`."""
    options: dict[str, Any] = {
        # A redelivery must not race a live job: keep it above the job's hard limit.
        "visibility_timeout": int(settings.job_time_limit_s) + 3600,
    }
    folders = broker_folders(settings)
    if folders:
        options.update(
            {
                "data_folder_in": str(folders["queue"]),
                "data_folder_out": str(folders["queue"]),
                "processed_folder": str(folders["processed"]),
                "control_folder": str(folders["control"]),
                "store_processed": False,
            }
        )
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration both the API's producer and the worker use."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A job is acknowledged only when it ends, and re-delivered if the worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": int(settings.job_time_limit_s),
        "task_soft_time_limit": max(1, int(settings.job_time_limit_s) - 60),
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }
