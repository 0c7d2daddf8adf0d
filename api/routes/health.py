"""/healthz, /readyz, /metrics (outside /v1: infrastructure, not API)."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from hawada.api.deps import SettingsDep
from hawada.settings import Settings
from hawada.store.db import get_engine

router = APIRouter(tags=["health"])


def _check_db(settings: Settings) -> str | None:
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; say which
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


@router.get("/readyz", responses={503: {"description": "a dependency is down"}})
def readyz(settings: SettingsDep) -> JSONResponse:
    """Readiness: the database answers and the broker is reachable."""
    checks: dict[str, Any] = {"database": _check_db(settings), "broker": _check_broker(settings)}
    failed = {name: err for name, err in checks.items() if err is not None}
    if failed:
        message = "; ".join(f"{name}: {err}" for name, err in failed.items())
        return JSONResponse(
            {
                "error": {
                    "code": "not_ready",
                    "message": message,
                    "details": [{"path": name, "message": err} for name, err in failed.items()],
                }
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok", "checks": dict.fromkeys(checks, "ok")})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition of this app's registry."""
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
