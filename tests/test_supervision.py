"""Supervision: `hawada serve` restarts a dead worker, /readyz needs a live worker's heartbeat,
the API re-queues lapsed jobs by itself, and a SIGKILLed Celery parent costs one resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from services import Service, base_env, child_pids, tiny_recipe
from sqlalchemy import update

from hawada.api.main import create_app
from hawada.api.reaper import reap_and_send
from hawada.store import heartbeats
from hawada.store import jobs as repo
from hawada.store.db import db_now, session_scope
from hawada.store.models import Job
from hawada.worker.cli import WorkerSupervisor


def test_supervisor_restarts_a_dying_worker_with_backoff() -> None:
    started: list[float] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])

    sup = WorkerSupervisor(start, min_backoff_s=0.2, max_backoff_s=0.8, healthy_s=60)
    sup.start()
    deadline = time.monotonic() + 30
    while len(started) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    sup.stop()
    sup.join(10)
    assert len(started) >= 4, started
    # Each quick failure doubles the wait, up to the maximum.
    assert sup.delays[:4] == [0.2, 0.4, 0.8, 0.8][: len(sup.delays[:4])]
    assert len(sup.delays) >= 3
    assert not sup.is_alive()


def test_supervisor_stop_stops_the_worker() -> None:
    sup = WorkerSupervisor(
        lambda: subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
    )
    sup.start()
    deadline = time.monotonic() + 10
    while sup.proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = sup.proc
    assert proc is not None
    sup.stop()
    sup.join(10)
    assert proc.poll() is not None and sup.starts == 1


def test_readyz_needs_a_live_worker_heartbeat(settings: Any) -> None:
    quick = settings.model_copy(update={"heartbeat_s": 0.3})
    with TestClient(create_app(quick)) as client:  # the real Celery enqueuer: needs a worker
        resp = client.get("/readyz")
        assert resp.status_code == 503 and resp.json()["checks"]["worker"] == "down"
        with session_scope(quick.database_url) as session:
            heartbeats.beat(session, "w1@host")
        resp = client.get("/readyz")
        assert resp.status_code == 200 and resp.json()["checks"]["worker"] == "ok"
        time.sleep(1.2)  # > 3 x heartbeat_s without a beat: the worker is presumed dead
        assert client.get("/readyz").status_code == 503
        with session_scope(quick.database_url) as session:
            heartbeats.beat(session, "w1@host")
            heartbeats.forget(session, "w1@host")  # a clean shutdown removes the row at once
        assert client.get("/readyz").status_code == 503


def test_api_reaper_requeues_without_any_worker(settings: Any) -> None:
    sent: list[str] = []
    with session_scope(settings.database_url) as session:
        job_id = repo.create_job(
            session, owner="a", recipe={}, recipe_hash="h", weights_path="w"
        ).id
        assert repo.claim_job(session, job_id, "dead-worker", 60)
    assert reap_and_send(settings, sent.append) == []  # the lease is alive
    with session_scope(settings.database_url) as session:  # ... until its worker stops renewing
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=db_now(session) - timedelta(seconds=1))
        )
        session.commit()
    assert reap_and_send(settings, sent.append) == [job_id]
    assert sent == [job_id]
    with session_scope(settings.database_url) as session:
        assert repo.load_job(session, job_id).status == "queued"


def _celery_parent(serve_pid: int) -> int | None:
    for pid in child_pids(serve_pid):
        with contextlib.suppress(OSError):
            if "celery" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigkilled_celery_parent_is_restarted_and_the_job_resumes_once(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model

    weights = tmp_path / "w.safetensors"
    save_file(build_model("resnet18", num_classes=10, stem="cifar").state_dict(), str(weights))
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    env = base_env(var_dir)
    env.update(HAWADA_LEASE_S="4", HAWADA_HEARTBEAT_S="1")
    svc = Service(env, var_dir, embedded=True)
    try:
        serve_pid = svc.procs[0].pid
        job_id = svc.client.submit(tiny_recipe(train={"steps": 150, "log_every": 10}), weights)[
            "id"
        ]
        ckpt = var_dir / "checkpoints" / job_id / "train_state.json"
        deadline = time.monotonic() + 240
        while not ckpt.exists():  # a checkpoint to resume from (every 10 s of training)
            assert time.monotonic() < deadline, svc.tail()
            time.sleep(0.2)
        parent = _celery_parent(serve_pid)
        assert parent is not None
        child = child_pids(parent)
        os.kill(parent, signal.SIGKILL)
        # The job child dies with its parent (no orphan finishes the job behind our back).
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{c}").exists() for c in child):
            assert time.monotonic() < deadline, "job child outlived its Celery parent"
            time.sleep(0.1)
        # serve starts a new worker; /readyz is ready again once it beats.
        deadline = time.monotonic() + 120
        while (_celery_parent(serve_pid) in (None, parent)) or not svc.client.ready():
            assert time.monotonic() < deadline, svc.tail()
            time.sleep(0.3)
        job = svc.client.wait(job_id, poll_s=0.5, timeout=600)
        assert job["status"] == "succeeded", f"{job}\n{svc.tail()}"
        assert job["attempts"] == 2
        events = svc.client.events(job_id)
        kinds = [e["kind"] for e in events]
        assert kinds.count("requeued") == 1
        messages = [str(e["data"].get("message", "")) for e in events]
        assert any("attempt 2: resuming from checkpoint" in m for m in messages), messages
        assert any("resuming gate training at step" in m for m in messages), messages
        assert not (var_dir / "checkpoints" / job_id).exists()
        assert not list((var_dir / "work").glob(f"{job_id}-*"))
    finally:
        svc.stop()


def test_worker_alive_health_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hawada worker-alive` (the compose worker's health check) reads this host's heartbeat."""
    import socket

    from typer.testing import CliRunner

    from hawada.cli import app
    from hawada.settings import get_settings, reset_settings
    from hawada.store.db import init_db

    for key in [k for k in os.environ if k.startswith("HAWADA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HAWADA_VAR_DIR", str(tmp_path / "var"))
    reset_settings()
    try:
        url = get_settings().database_url
        (tmp_path / "var").mkdir()
        init_db(url)
        runner = CliRunner()
        assert runner.invoke(app, ["worker-alive"]).exit_code == 1
        with session_scope(url) as session:
            heartbeats.beat(session, "elsewhere:1")  # another host's worker does not count
        assert runner.invoke(app, ["worker-alive"]).exit_code == 1
        with session_scope(url) as session:
            heartbeats.beat(session, f"{socket.gethostname()}:42")
        result = runner.invoke(app, ["worker-alive"])
        assert result.exit_code == 0, result.output
    finally:
        reset_settings()
