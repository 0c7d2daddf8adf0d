"""/healthz, /readyz, /metrics (outside /v1: infrastructure, not API)."""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from hawada.api.deps import SettingsDep
from hawada.settings import Settings
from hawada.store.db import get_engine, session_scope
from hawada.store.heartbeats import live_workers

router = APIRouter(tags=["health"])
log = logging.getLogger("hawada.api")


def _check_db(settings: Settings) -> str | None:
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; the log says why
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None


def _check_broker(settings: Settings) -> str | None:
    url = settings.broker_url
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            try:
                client.ping()
            finally:
                client.close()
        elif url.startswith("filesystem://"):
            folder = settings.broker_dir
            folder.mkdir(parents=True, exist_ok=True)  # the API writes messages here
            if not os.access(folder, os.W_OK):
                return f"broker folder {folder} is not writable"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None  # other transports: nothing cheap to check


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


def _check_worker(settings: Settings) -> str | None:
    try:
        with session_scope(settings.database_url) as session:
            alive = live_workers(session, 3 * settings.heartbeat_s)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return None if alive else f"no worker heartbeat within {3 * settings.heartbeat_s:.0f} s"


@router.get("/readyz", responses={503: {"description": "a dependency is down"}})
def readyz(request: Request, settings: SettingsDep) -> JSONResponse:
    """Readiness: the database answers, the broker is reachable and a worker is alive."""
    checks: dict[str, Any] = {"database": _check_db(settings), "broker": _check_broker(settings)}
    if request.app.state.needs_worker:  # a stand-in enqueuer (tests) has no worker to wait for
        checks["worker"] = _check_worker(settings)
    failed = {name: err for name, err in checks.items() if err is not None}
    states = {name: "down" if name in failed else "ok" for name in checks}
    if failed:
        # Component names and states only: the reasons (hosts, ports, paths) go to the log.
        for name, err in failed.items():
            log.warning("readiness: %s is down: %s", name, err)
        message = "not ready: " + ", ".join(f"{name} down" for name in failed)
        return JSONResponse(
            {
                "error": {
                    "code": "not_ready",
                    "message": message,
                    "details": [{"path": name, "message": "down"} for name in failed],
                },
                "checks": states,
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok", "checks": states})


@router.get("/metrics", response_class=Response)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus exposition. With auth required, job data only for the operator key."""
    registry = request.app.state.registry
    if settings.auth_required:
        _, _, token = request.headers.get("authorization", "").partition(" ")
        key = settings.operator_key
        if not (key and token and hmac.compare_digest(token.strip().encode(), key.encode())):
            registry = request.app.state.public_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
