"""Runner behaviour against a real SQLite store: exclusive claims, outcomes recorded,
cancellation seen through the lease thread, artifacts stored with checksums, reaping.

The engine is replaced by small stand-in functions here (the integration tests run the real
one); what is asserted is the job's state in the database and the files on disk."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from hawada.core.errors import JobCancelled, WeightsError
from hawada.settings import Settings
from hawada.store import jobs
from hawada.store.db import init_db, session_scope
from hawada.store.models import Job, utcnow
from hawada.worker import runner


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(var_dir=tmp_path, lease_s=0.9, max_attempts=2)
    init_db(s.database_url)
    return s


def _new_job(s: Settings, **kw: Any) -> str:
    with session_scope(s.database_url) as session:
        job = jobs.create_job(
            session,
            owner="alice",
            recipe={"model": {"arch": "resnet18"}, "data": {"source": "synthetic"}},
            recipe_hash="0" * 64,
            weights_path="/nonexistent.safetensors",
            max_attempts=s.max_attempts,
            **kw,
        )
        return job.id


def _job(s: Settings, job_id: str) -> Job:
    with session_scope(s.database_url) as session:
        return jobs.load_job(session, job_id)


def _events(s: Settings, job_id: str) -> list[dict[str, Any]]:
    with session_scope(s.database_url) as session:
        return [{"kind": e.kind, **e.data} for e in jobs.list_events(session, job_id)]


def _fake_pipeline(monkeypatch: pytest.MonkeyPatch, body: Any) -> None:
    def fake(settings, spec, work, checkpoint_dir, sink, cancel):  # same signature
        return body(work, sink, cancel)

    monkeypatch.setattr(runner, "_run_pipeline", fake)


def test_importing_the_worker_does_not_import_torch() -> None:
    code = (
        "import sys, hawada.worker.app, hawada.worker.tasks, hawada.worker.runner, "
        "hawada.worker.lut_cache; sys.exit('torch' in sys.modules)"
    )
    import subprocess

    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_claim_is_exclusive(settings: Settings) -> None:
    job_id = _new_job(settings)
    wins: list[bool] = []

    def claim(i: int) -> None:
        with session_scope(settings.database_url) as session:
            wins.append(jobs.claim_job(session, job_id, f"w{i}", settings.lease_s))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
    # A worker handed an already-claimed job leaves it alone.
    assert runner.execute(job_id, settings) is None
    assert _job(settings, job_id).status == "running"


def test_success_stores_artifacts_and_metrics(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b'{"arch": "resnet18"}'

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        sink({"kind": "phase", "phase": "training"})
        for step in range(50):  # a burst of progress events: throttled to about one a second
            sink({"kind": "progress", "phase": "training", "progress": step / 50, "step": step})
        sink({"kind": "progress", "phase": "training", "progress": 1.0, "step": 50})
        (work / "pruned.json").write_bytes(payload)
        (work / "scratch.tmp").write_bytes(b"not an artifact")
        return {
            "baseline": {"params": 100, "flops": 1000, "latency_ms": 2.0, "accuracy": 0.9},
            "pruned": {"params": 50, "flops": 480, "latency_ms": 1.2, "accuracy": 0.88},
            "target_met": True,
            "speedup": {"measured": 1.67},
        }

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    assert runner.execute(job_id, settings) == "succeeded"
    job = _job(settings, job_id)
    assert job.status == "succeeded" and job.progress == 1.0 and job.lease_expires_at is None
    assert job.metrics["pruned"]["params"] == 50 and job.metrics["speedup"] == 1.67
    stored = Path(settings.artifacts_dir) / "jobs" / job_id / "pruned.json"
    assert stored.read_bytes() == payload
    assert not (stored.parent / "scratch.tmp").exists()
    with session_scope(settings.database_url) as session:
        art = jobs.get_artifact(session, job_id, "pruned.json")
    assert art.size == len(payload) and art.sha256 == hashlib.sha256(payload).hexdigest()
    kinds = [e["kind"] for e in _events(settings, job_id)]
    assert kinds[0] == "phase" and 2 <= kinds.count("progress") <= 3
    # The temporary work folder and checkpoints are gone after a terminal outcome.
    assert list((Path(settings.var_dir) / "work").iterdir()) == []
    assert not (Path(settings.var_dir) / "checkpoints" / job_id).exists()


def test_user_error_is_recorded_with_its_code(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        raise WeightsError("missing keys: fc.weight", code="weights_mismatch")

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    assert runner.execute(job_id, settings) == "failed"
    job = _job(settings, job_id)
    assert (job.status, job.error_code) == ("failed", "weights_mismatch")
    assert "fc.weight" in job.error_message


def test_crash_is_failed_internal_without_traceback_or_paths(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = str(Path(settings.var_dir).resolve() / "work" / "x.py")

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        raise ZeroDivisionError(f"boom in {secret}")

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    with caplog.at_level("ERROR", logger="hawada.worker"):
        assert runner.execute(job_id, settings) == "failed"
    job = _job(settings, job_id)
    assert job.error_code == "internal" and "ZeroDivisionError" in job.error_message
    seen = job.error_message + "".join(str(e) for e in _events(settings, job_id))
    assert "Traceback" not in seen and secret not in seen and "boom" not in seen
    # The worker's log has the whole story, findable by the reference the user sees.
    ref = job.error_message.split("reference ")[1].split()[0]
    record = next(r for r in caplog.records if ref in r.getMessage())
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


def test_user_error_messages_lose_server_folders(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(settings.artifacts_dir).resolve()

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        raise WeightsError(f"{folder}/uploads/weights/abc.safetensors is not valid")

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    assert runner.execute(job_id, settings) == "failed"
    message = _job(settings, job_id).error_message
    assert message == "uploads/weights/abc.safetensors is not valid"


def test_cancel_during_the_last_phase_never_ends_succeeded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that arrives while packaging (the pipeline then returns normally) wins."""

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        with session_scope(settings.database_url) as session:
            jobs.request_cancel(session, "alice", body.job_id)
        deadline = time.monotonic() + 10
        while not cancel.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)  # the lease keeper mirrors the flag
        return {}

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    body.job_id = job_id  # type: ignore[attr-defined]
    assert runner.execute(job_id, settings) == "cancelled"
    assert _job(settings, job_id).status == "cancelled"
    assert _job(settings, job_id).error_code == "cancelled"


def test_cancel_request_reaches_the_running_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        started.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the engine polls should_cancel each step
            if cancel.is_set():
                raise JobCancelled()
            time.sleep(0.01)
        raise AssertionError("cancel flag never seen")

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    result: list[str | None] = []
    t = threading.Thread(target=lambda: result.append(runner.execute(job_id, settings)))
    t.start()
    assert started.wait(10)
    asked = time.monotonic()
    with session_scope(settings.database_url) as session:
        assert jobs.request_cancel(session, "alice", job_id).status == "cancelling"
    t.join(20)
    assert result == ["cancelled"]
    assert time.monotonic() - asked < 5
    assert _job(settings, job_id).status == "cancelled"


def test_lease_is_renewed_while_running(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        time.sleep(2.0)  # > 2 lease periods: without renewal the lease would lapse
        # Compared with the time it was read, not with the end of the job: on a loaded machine
        # the job's own wind-down can outlast one lease period.
        seen.append((_job(settings, body.job_id).lease_expires_at, utcnow()))
        return {}

    _fake_pipeline(monkeypatch, body)
    body.job_id = _new_job(settings)  # type: ignore[attr-defined]
    assert runner.execute(body.job_id, settings) == "succeeded"  # type: ignore[attr-defined]
    lease_expires_at, read_at = seen[0]
    assert lease_expires_at > read_at


def test_reaper_requeues_lapsed_and_fails_out_of_attempts(settings: Settings) -> None:
    job_id = _new_job(settings)
    sent: list[str] = []
    with session_scope(settings.database_url) as session:
        assert jobs.claim_job(session, job_id, "dead-worker", settings.lease_s)
    past = utcnow() - timedelta(seconds=5)

    def lapse() -> None:
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))
            session.commit()

    lapse()
    assert runner.reap_once(settings, send=sent.append) == [job_id]
    assert sent == [job_id] and _job(settings, job_id).status == "queued"
    # Second attempt also dies: attempts (2) are used up, so the job fails for good.
    with session_scope(settings.database_url) as session:
        assert jobs.claim_job(session, job_id, "dead-worker-2", settings.lease_s)
    lapse()
    assert runner.reap_once(settings, send=sent.append) == []
    job = _job(settings, job_id)
    assert (job.status, job.error_code) == ("failed", "lease_lost")


def test_lut_cache_round_trip(settings: Settings) -> None:
    from hawada.worker.lut_cache import StoreLutCache

    cache = StoreLutCache(settings.database_url)
    assert cache.get("cpu|resnet18|16") is None
    cache.put("cpu|resnet18|16", b"\x00table")
    cache.put("cpu|resnet18|16", b"\x01table")  # re-measured: replaced, not an error
    assert cache.get("cpu|resnet18|16") == b"\x01table"


def test_job_progress_is_overall_and_monotone(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        for phase in ("loading", "baseline", "profiling", "training"):
            sink({"kind": "phase", "phase": phase})
            seen.append(_job(settings, body.job_id).progress)
        for frac in (0.5, 1.0):
            sink({"kind": "progress", "phase": "training", "progress": frac})
            seen.append(_job(settings, body.job_id).progress)
        for phase in ("exporting", "finetuning", "evaluating", "packaging"):
            sink({"kind": "phase", "phase": phase})
            seen.append(_job(settings, body.job_id).progress)
        return {}

    _fake_pipeline(monkeypatch, body)
    body.job_id = _new_job(settings)  # type: ignore[attr-defined]
    assert runner.execute(body.job_id, settings) == "succeeded"  # type: ignore[attr-defined]
    assert seen == sorted(seen) and seen[0] == 0.0 and 0.9 < seen[-1] < 1.0
    assert _job(settings, body.job_id).progress == 1.0  # type: ignore[attr-defined]


def test_soft_time_limit_fails_with_time_limit(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    def body(work: Path, sink: Any, cancel: threading.Event) -> dict[str, Any]:
        raise SoftTimeLimitExceeded()

    _fake_pipeline(monkeypatch, body)
    job_id = _new_job(settings)
    assert runner.execute(job_id, settings) == "failed"
    assert _job(settings, job_id).error_code == "time_limit"
