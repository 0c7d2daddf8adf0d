"""The worker's Celery application (`celery -A hawada.worker.app worker`).

Its configuration, the task name and the queue come from `hawada.store.broker`, which the
API's producer uses too; the API never imports this module. No torch here: the Celery parent
process stays torch-free and jobs run in forked children (`hawada.worker.tasks`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_init

from hawada.settings import Settings, get_settings
from hawada.store.broker import celery_config, ensure_broker_folders


def make_celery(settings: Settings) -> Celery:
    """Build the worker's Celery app for `settings` (broker, reliability and limits)."""
    app = Celery("hawada", broker=settings.broker_url, include=["hawada.worker.tasks"])
    app.conf.update(celery_config(settings))
    return app


celery_app = make_celery(get_settings())


@celeryd_init.connect
def _create_broker_folders(**_: Any) -> None:
    # When the worker starts, not at import: importing this module must not touch the disk.
    ensure_broker_folders(get_settings())
