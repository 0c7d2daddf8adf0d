"""Tenancy and bounds: keys on every /v1 route, no tenant data in /metrics or /readyz, retries
after a failed enqueue, DELETE against a concurrent claim, leftovers removed, per-owner caps,
and leases on the database's clock."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from weights_files import fitting_safetensors

from hawada.api.main import create_app
from hawada.store import jobs as repo
from hawada.store import keys
from hawada.store.db import session_scope
from hawada.worker import runner

RECIPE = (
    "model: {arch: resnet18, num_classes: 10, stem: cifar}\ndata: {source: synthetic}\n"
    "train: {steps: 2}\n"
)


def submit(client: TestClient, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        "/v1/jobs",
        data={"recipe": RECIPE},
        files={"weights": ("w.safetensors", fitting_safetensors("resnet18", 10, "cifar"))},
        headers=headers or {},
    )


def uploads(settings: Any) -> list[Path]:
    root = Path(settings.artifacts_dir) / "uploads"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def secured(settings: Any) -> Any:
    return settings.model_copy(update={"auth_required": True, "operator_key": "op-secret"})


def make_keys(settings: Any) -> tuple[dict[str, str], dict[str, str]]:
    with session_scope(settings.database_url) as s:
        alice, bob = keys.create_key(s, "alice"), keys.create_key(s, "bob")
    return {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}


def test_every_v1_route_needs_a_key(secured: Any) -> None:
    with TestClient(create_app(secured, enqueue=lambda _: None)) as client:
        as_alice, _ = make_keys(secured)
        paths = client.get("/openapi.json").json()["paths"]
        v1 = {p: ops for p, ops in paths.items() if p.startswith("/v1")}
        assert len(v1) >= 7
        for template, ops in v1.items():
            path = template.replace("{job_id}", "0" * 32).replace("{model_id}", "0" * 32)
            path = path.replace("{name}", "report.json")
            for method in ops:
                resp = client.request(method.upper(), path)
                assert resp.status_code == 401, (method, path, resp.text)
                assert resp.json()["error"]["code"] == "unauthorized"
        assert client.get("/v1/recipes", headers=as_alice).status_code == 200
        assert client.get("/v1/architectures", headers=as_alice).status_code == 200


def test_metrics_show_job_data_only_to_the_operator(secured: Any) -> None:
    with TestClient(create_app(secured, enqueue=lambda _: None)) as client:
        as_alice, _ = make_keys(secured)
        assert submit(client, as_alice).status_code == 202
        public = client.get("/metrics", headers=as_alice).text
        assert "hawada_jobs" not in public and "hawada_phase" not in public
        assert "hawada_http_request_duration_seconds" in public
        operator = client.get("/metrics", headers={"Authorization": "Bearer op-secret"}).text
        assert 'hawada_jobs{state="queued"} 1.0' in operator
        assert "hawada_http_request_duration_seconds" in operator


def test_readyz_names_components_not_addresses(settings: Any) -> None:
    down = settings.model_copy(update={"broker_url": "redis://10.11.12.13:6399/0"})
    with TestClient(create_app(down, enqueue=lambda _: None)) as client:
        resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"] == {"database": "ok", "broker": "down"}
    assert "10.11.12.13" not in resp.text and "6399" not in resp.text


def test_failed_enqueue_frees_the_idempotency_key(settings: Any) -> None:
    calls: list[str] = []

    def flaky(job_id: str) -> None:
        calls.append(job_id)
        if len(calls) == 1:
            raise ConnectionError("redis://10.0.0.1:6379 refused")

    with TestClient(create_app(settings, enqueue=flaky)) as client:
        first = submit(client, {"Idempotency-Key": "k1"})
        assert first.status_code == 503 and "10.0.0.1" not in first.text
        retry = submit(client, {"Idempotency-Key": "k1"})
        assert retry.status_code == 202, retry.text
        assert retry.json()["status"] == "queued" and retry.json()["id"] == calls[1]
        again = submit(client, {"Idempotency-Key": "k1"})  # now the key replays the accepted job
        assert again.status_code == 200 and again.json()["id"] == calls[1]
        failed = client.get(f"/v1/jobs/{calls[0]}").json()
        assert failed["error"]["code"] == "broker_unavailable"
        assert "10.0.0.1" not in str(failed)


def test_delete_never_races_a_claim(settings: Any) -> None:
    """Concurrent DELETE and claim: exactly one wins, neither raises, no half state."""
    outcomes = {"deleted": 0, "claimed": 0}
    for _ in range(15):
        with session_scope(settings.database_url) as s:
            job_id = repo.create_job(
                s, owner="alice", recipe={}, recipe_hash="h", weights_path="w"
            ).id
        barrier = threading.Barrier(2)
        result: dict[str, Any] = {}

        def claim(
            job_id: str = job_id, result: dict[str, Any] = result, barrier: Any = barrier
        ) -> None:
            barrier.wait()
            with session_scope(settings.database_url) as s:
                result["claimed"] = repo.claim_job(s, job_id, "w1", 60)

        def delete(
            job_id: str = job_id, result: dict[str, Any] = result, barrier: Any = barrier
        ) -> None:
            barrier.wait()
            with session_scope(settings.database_url) as s:
                try:
                    result["deleted"] = repo.delete_job(s, "alice", job_id)
                except repo.JobBusy:
                    result["deleted"] = False

        threads = [threading.Thread(target=claim), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert result["claimed"] != result["deleted"], result
        with session_scope(settings.database_url) as s:
            job = repo.get_job(s, "alice", job_id)
        assert (job is None) == result["deleted"]
        assert job is None or job.status == "running"
        outcomes["deleted" if result["deleted"] else "claimed"] += 1
    assert sum(outcomes.values()) == 15


def _leftovers(var: Path, job_id: str) -> tuple[Path, Path]:
    ckpt = var / "checkpoints" / job_id
    work = var / "work" / f"{job_id}-old"
    for folder in (ckpt, work):
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"x")
    return ckpt, work


def test_delete_removes_checkpoints_and_work_folders(settings: Any) -> None:
    with TestClient(create_app(settings, enqueue=lambda _: None)) as client:
        job_id = submit(client).json()["id"]
        ckpt, work = _leftovers(Path(settings.var_dir), job_id)
        client.post(f"/v1/jobs/{job_id}/cancel")
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert not ckpt.exists() and not work.exists()


def test_reaper_sweeps_what_killed_attempts_left(settings: Any) -> None:
    var = Path(settings.var_dir)
    ids = {}
    with session_scope(settings.database_url) as s:
        for state in ("queued", "running", "failed"):
            ids[state] = repo.create_job(
                s, owner="a", recipe={}, recipe_hash="h", weights_path="w"
            ).id
        assert repo.claim_job(s, ids["running"], "w1", 60)
        assert repo.finish_job(s, ids["failed"], "failed", error={"code": "x", "message": "y"})
    folders = {state: _leftovers(var, job_id) for state, job_id in ids.items()}
    gone = "f" * 32
    _leftovers(var, gone)  # a deleted job's
    assert sorted(runner.sweep_leftovers(settings)) == sorted([ids["failed"], gone])
    assert not any(p.exists() for p in folders["failed"])
    ckpt, work = folders["queued"]
    assert ckpt.exists() and not work.exists()  # the next attempt resumes from the checkpoint
    assert all(p.exists() for p in folders["running"])
    assert not (var / "checkpoints" / gone).exists()


def test_active_jobs_per_owner_are_capped(secured: Any) -> None:
    capped = secured.model_copy(update={"max_active_jobs_per_owner": 2})
    with TestClient(create_app(capped, enqueue=lambda _: None)) as client:
        as_alice, as_bob = make_keys(capped)
        assert [submit(client, as_alice).status_code for _ in range(2)] == [202, 202]
        before = len(uploads(capped))
        resp = submit(client, as_alice)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "too_many_active_jobs"
        assert int(resp.headers["retry-after"]) > 0
        assert len(uploads(capped)) == before  # the refused request's files are gone
        assert submit(client, as_bob).status_code == 202  # other owners are not affected
        job_id = client.get("/v1/jobs", headers=as_alice).json()["items"][0]["id"]
        client.post(f"/v1/jobs/{job_id}/cancel", headers=as_alice)
        assert submit(client, as_alice).status_code == 202  # a slot freed up


def test_event_streams_per_owner_are_capped(settings: Any) -> None:
    capped = settings.model_copy(update={"max_event_streams_per_owner": 1})
    with TestClient(create_app(capped, enqueue=lambda _: None)) as client:
        job_id = submit(client).json()["id"]
        sse = {"accept": "text/event-stream"}
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=sse) as first:
            assert first.status_code == 200
            next(first.iter_lines())  # the stream is open and counted
            second = client.get(f"/v1/jobs/{job_id}/events", headers=sse)
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "too_many_streams"
            # polling is never capped
            assert client.get(f"/v1/jobs/{job_id}/events").status_code == 200


def test_leases_use_the_database_clock(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose clock is an hour behind still gets a lease that lasts lease_s."""
    from hawada.store import models

    with session_scope(settings.database_url) as s:
        job_id = repo.create_job(s, owner="a", recipe={}, recipe_hash="h", weights_path="w").id
    skewed = models.utcnow() - timedelta(hours=1)
    monkeypatch.setattr(repo, "utcnow", lambda: skewed)
    with session_scope(settings.database_url) as s:
        assert repo.claim_job(s, job_id, "slow-clock", 60)
    monkeypatch.undo()
    with session_scope(settings.database_url) as s:
        assert repo.requeue_expired(s) == []  # another host's reaper: the lease has not lapsed
        assert repo.load_job(s, job_id).status == "running"


def test_revoked_key_stops_working_once_its_cache_entry_expires(
    secured: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys are cached per process for KEY_CACHE_S (polling costs no lookup); revocation holds
    after that."""
    import time

    from hawada.api import deps

    monkeypatch.setattr(deps, "KEY_CACHE_S", 0.3)
    with TestClient(create_app(secured, enqueue=lambda _: None)) as client:
        as_alice, _ = make_keys(secured)
        assert client.get("/v1/jobs", headers=as_alice).status_code == 200
        with session_scope(secured.database_url) as s:
            assert keys.revoke_key(s, keys.list_keys(s, "alice")[0].id)
        time.sleep(0.5)
        assert client.get("/v1/jobs", headers=as_alice).status_code == 401


def test_event_streams_share_a_few_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many open streams poll through at most STREAM_THREADS worker threads together, so they
    cannot take the thread pool that `GET /v1/jobs/{id}` needs (a real server on loopback)."""
    import time

    import httpx
    from apiserver import ApiServer

    from hawada.api.routes import events
    from hawada.settings import Settings

    busy = {"now": 0, "max": 0}
    lock = threading.Lock()
    real_page = events._page

    def slow_page(*args: Any) -> Any:
        with lock:
            busy["now"] += 1
            busy["max"] = max(busy["max"], busy["now"])
        try:
            time.sleep(0.05)
            return real_page(*args)
        finally:
            with lock:
                busy["now"] -= 1

    monkeypatch.setattr(events, "_page", slow_page)
    monkeypatch.setattr(events, "POLL_S", 0.01)
    settings = Settings(var_dir=tmp_path / "var", max_event_streams_per_owner=50)
    server = ApiServer(settings)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            job_id = submit(client).json()["id"]  # the fake worker leaves it queued
            with session_scope(settings.database_url) as s:
                assert repo.claim_job(s, job_id, "w", 60)  # running: its streams stay open

            def follow() -> None:
                with (
                    httpx.Client(base_url=server.url, timeout=30) as own,
                    own.stream(
                        "GET", f"/v1/jobs/{job_id}/events", headers={"accept": "text/event-stream"}
                    ) as resp,
                ):
                    assert resp.status_code == 200
                    time.sleep(1.5)  # open and polling

            threads = [threading.Thread(target=follow) for _ in range(16)]
            for t in threads:
                t.start()
            time.sleep(0.7)
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            for t in threads:
                t.join(30)
    finally:
        server.stop()
    assert 1 <= busy["max"] <= events.STREAM_THREADS, busy
