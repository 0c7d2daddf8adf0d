"""The anchor of bench/api.py: the naive way to serve one job row over HTTP.

FastAPI, a sync route, SQLAlchemy Core on the same SQLite file HawAda uses, no auth, no
middleware: what `GET /v1/jobs/{id}` costs at the least. Run by bench/api.py with
`uvicorn --factory bench.naive_app:create_app`; HAWADA_BENCH_DB names the database file.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine, text


def create_app() -> FastAPI:
    """One route reading one row (connection pool sized like uvicorn's thread pool)."""
    engine = create_engine(f"sqlite:///{os.environ['HAWADA_BENCH_DB']}", pool_size=40)
    app = FastAPI()

    @app.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT id, status, phase, progress, created_at, error_code, error_message "
                    "FROM jobs WHERE id = :id"
                ),
                {"id": job_id},
            ).first()
        if row is None:
            raise HTTPException(404)
        return dict(row._mapping)

    return app
