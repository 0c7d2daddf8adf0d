"""A real API over HTTP for client and CLI tests: uvicorn in a thread on a loopback port, SQLite
in a temporary folder, and a fake worker in place of Celery that plays a job's part through the
store (claim, events through the worker's own EventSink, artifacts, outcome).
Used by test_cli.py and test_client.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hawada.settings import Settings

#: The events a fake job emits: two phases with progress, as the pipeline shapes them.
FAKE_STEPS = 10


def tiny_safetensors(path: Path) -> Path:
    """A safetensors file fitting resnet18/10 classes/cifar (the API checks names and shapes)."""
    from weights_files import fitting_safetensors

    path.write_bytes(fitting_safetensors("resnet18", 10, "cifar"))
    return path


class FakeWorker:
    """Enqueue hook: runs each submitted job in a thread, ending as ``outcome`` says.

    ``outcome`` is ``succeeded`` (with a ``report.json`` artifact), ``failed`` or ``cancelled``;
    ``None`` leaves jobs queued (the API only records them in ``enqueued``). ``pause_s`` spaces
    the events so a follower sees them arrive live.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enqueued: list[str] = []
        self.outcome: str | None = None
        self.pause_s = 0.0
        self.threads: list[threading.Thread] = []

    def __call__(self, job_id: str) -> None:
        self.enqueued.append(job_id)
        if self.outcome is not None:
            thread = threading.Thread(target=self.run, args=(job_id, self.outcome), daemon=True)
            self.threads.append(thread)
            thread.start()

    def run(self, job_id: str, outcome: str) -> None:
        """Play the worker's part for one job."""
        from hawada.store import jobs
        from hawada.store.artifacts import ArtifactStore
        from hawada.store.db import session_scope
        from hawada.worker.runner import EventSink

        url = self.settings.database_url
        with session_scope(url) as session:
            assert jobs.claim_job(session, job_id, "fake-worker", 60)
        sink = EventSink(url, job_id, clock=_Ticker())
        for phase in ("loading", "training"):
            sink({"kind": "phase", "phase": phase})
            time.sleep(self.pause_s)
        for step in range(1, FAKE_STEPS + 1):
            sink(
                {
                    "kind": "progress",
                    "phase": "training",
                    "progress": step / FAKE_STEPS,
                    "step": step,
                    "steps": FAKE_STEPS,
                    "loss": 1.0 / step,
                    "cost_ratio": 1.0 - 0.05 * step,
                    "target": 0.5,
                    "target_ratio": 0.5,
                }
            )
            time.sleep(self.pause_s)
        sink({"kind": "log", "message": "hard-gated vs exported max abs diff 1e-07"})
        with session_scope(url) as session:
            if outcome == "succeeded":
                payload = json.dumps({"baseline": {"params": 10}, "pruned": {"params": 5}})
                size, sha = ArtifactStore(self.settings.artifacts_dir).write(
                    job_id, "report.json", payload.encode()
                )
                jobs.record_artifact(session, job_id, "report.json", size, sha)
                metrics = {
                    "baseline": {"params": 10, "flops": 100, "latency_ms": 2.0, "accuracy": 0.9},
                    "pruned": {"params": 5, "flops": 50, "latency_ms": 1.0, "accuracy": 0.88},
                    "target": {"metric": "flops", "ratio": 0.5},
                    "target_met": True,
                    "warnings": [{"code": "latency_noisy", "message": "latency varied widely"}],
                }
                jobs.finish_job(session, job_id, "succeeded", metrics=metrics)
            elif outcome == "failed":
                error = {"code": "weights_mismatch", "message": "fc.weight has shape [5, 512]"}
                jobs.finish_job(session, job_id, "failed", error=error)
            else:
                error = {"code": "cancelled", "message": "cancelled by request"}
                jobs.finish_job(session, job_id, "cancelled", error=error)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)


class _Ticker:
    """A clock for EventSink that moves 2 s per call, so no progress event is throttled."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 2.0
        return self.now


class ApiServer:
    """uvicorn serving ``create_app(settings, enqueue=FakeWorker)`` on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from hawada.api.main import create_app

        self.worker = FakeWorker(settings)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            create_app(settings, enqueue=self.worker),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    @property
    def enqueued(self) -> list[str]:
        return self.worker.enqueued

    def stop(self) -> None:
        self.worker.join()
        self.server.should_exit = True
        self.thread.join(10)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def job_with(
    settings: Settings, server: ApiServer, recipe: Any, weights: Path, outcome: str
) -> str:
    """Submit over HTTP and let the fake worker end the job as ``outcome``; returns its id."""
    from hawada.client import HawadaClient

    server.worker.outcome = outcome
    with HawadaClient(server.url) as hc:
        job_id = str(hc.submit(recipe, weights)["id"])
    server.worker.join()
    return job_id
