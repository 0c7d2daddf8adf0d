"""FastAPI application factory. Run with `uvicorn --factory hawada.api.main:create_serving_app`."""

from __future__ import annotations

import gc

from fastapi import Depends, FastAPI

from hawada.api.admission import DbAdmissionMiddleware
from hawada.api.deps import get_owner
from hawada.api.errors import install_error_handlers
from hawada.api.limits import BodyLimitMiddleware, route_caps
from hawada.api.metrics import HttpMetricsMiddleware, make_registry
from hawada.api.queue import CeleryEnqueuer, Enqueuer
from hawada.api.reaper import reaper_lifespan
from hawada.api.routes import artifacts, catalog, events, health, jobs, models
from hawada.api.routes.jobs import JobBodyCache
from hawada.settings import Settings, get_settings
from hawada.store.artifacts import ArtifactStore
from hawada.store.db import POOL_CAPACITY, init_db
from hawada.version import __version__

DESCRIPTION = (
    "HawAda compresses trained torchvision CNNs for a FLOPs, parameter or latency budget. "
    "Submit a recipe and weights, poll the job, download the pruned model and its report."
)


def create_app(settings: Settings | None = None, enqueue: Enqueuer | None = None) -> FastAPI:
    """Build the API for `settings` (default: the environment); `enqueue` replaces Celery in tests.

    The database schema is upgraded to the newest migration first (a no-op when current).
    """
    settings = settings or get_settings()
    init_db(settings.database_url)
    needs_worker = enqueue is None
    app = FastAPI(
        title="HawAda",
        version=__version__,
        description=DESCRIPTION,
        lifespan=reaper_lifespan if needs_worker else None,
    )
    app.state.needs_worker = needs_worker
    app.state.settings = settings
    app.state.store = ArtifactStore(settings.artifacts_dir)
    app.state.job_cache = JobBodyCache()  # GET /v1/jobs/{id}'s recent answers (routes/jobs)
    app.state.event_streams = {}  # owner -> open SSE streams in this process (api/routes/events)
    app.state.enqueue = enqueue if enqueue is not None else CeleryEnqueuer(settings)
    registry, public_registry, http_histogram = make_registry(settings.database_url)
    app.state.registry = registry
    app.state.public_registry = public_registry
    app.add_middleware(DbAdmissionMiddleware, limit=POOL_CAPACITY // 2)
    app.add_middleware(HttpMetricsMiddleware, histogram=http_histogram)
    # Outermost of ours: bodies are capped before anything else sees a byte of them.
    app.add_middleware(BodyLimitMiddleware, cap_for=route_caps(settings.max_upload_bytes))
    install_error_handlers(app)
    # Every /v1 route needs a key when auth is required (the owner is resolved once per request
    # even where a route also asks for it); /healthz, /readyz and /metrics are infrastructure.
    for module in (jobs, events, artifacts, models, catalog):
        app.include_router(module.router, dependencies=[Depends(get_owner)])
    app.include_router(health.router)
    return app


def create_serving_app() -> FastAPI:
    """The app `hawada api` and `hawada serve` run: `create_app()`, then the objects loaded at
    start-up (FastAPI, SQLAlchemy, pydantic schemas: a few hundred thousand) are moved out of
    the cycle collector's view (`gc.freeze`), so its full collections, which otherwise pause
    every request in flight for tens of milliseconds, stay short under polling load."""
    app = create_app()
    gc.collect()
    gc.freeze()
    return app
