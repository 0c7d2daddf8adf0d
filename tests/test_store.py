"""Store tests on SQLite and PostgreSQL: schema, job state machine, keys, artifacts."""

from __future__ import annotations

import io
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from hawada.store import jobs, keys
from hawada.store.artifacts import ArtifactStore, UploadTooLarge, file_sha256
from hawada.store.db import get_engine, init_db, session_scope
from hawada.store.latency_tables import get_latency_table, put_latency_table
from hawada.store.models import Base, utcnow
from hawada.store.uploaded_models import create_model, get_model

RECIPE = {"model": {"arch": "resnet18"}}


def _job(s, owner: str = "alice", **kw):
    return jobs.create_job(
        s, owner=owner, recipe=RECIPE, recipe_hash="h" * 64, weights_path="/w", **kw
    )


def test_migration_matches_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    init_db(db_url)  # a second upgrade is a no-op
    with get_engine(db_url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_create_get_is_owner_scoped(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        assert len(job.id) == 32 and job.status == "queued" and job.attempts == 0
        assert jobs.get_job(s, "alice", job.id).recipe == RECIPE
        assert jobs.get_job(s, "bob", job.id) is None
        assert jobs.get_job(s, "alice", "0" * 32) is None


def test_idempotency_key_unique_per_owner(db_url: str) -> None:
    with session_scope(db_url) as s:
        _job(s, idempotency_key="k1")
        _job(s, owner="bob", idempotency_key="k1")  # other owner may reuse the key
        with pytest.raises(IntegrityError):
            _job(s, idempotency_key="k1")
        s.rollback()
        assert jobs.find_by_idempotency_key(s, "alice", "k1") is not None


def test_list_pagination_sees_every_job_once(db_url: str) -> None:
    with session_scope(db_url) as s:
        made = {_job(s).id for _ in range(5)}
        _job(s, owner="bob")
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page, cursor = jobs.list_jobs(s, "alice", limit=2, cursor=cursor)
            seen += [j.id for j in page]
            pages += 1
            if cursor is None:
                break
        assert pages == 3 and len(seen) == 5 and set(seen) == made
        created = [jobs.get_job(s, "alice", i).created_at for i in seen]
        assert created == sorted(created, reverse=True)
        with pytest.raises(jobs.InvalidCursor):
            jobs.list_jobs(s, "alice", cursor="garbage!")


def test_claim_is_exclusive(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        assert jobs.claim_job(s, job.id, "w1", 30)
        assert not jobs.claim_job(s, job.id, "w2", 30)
        got = jobs.load_job(s, job.id)
        assert (got.status, got.worker_id, got.attempts) == ("running", "w1", 1)
        assert got.started_at is not None and got.lease_expires_at > utcnow()


def test_claim_from_threads_has_one_winner(db_url: str) -> None:
    with session_scope(db_url) as s:
        job_ids = [_job(s).id for _ in range(3)]
    wins: list[tuple[str, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        barrier.wait()
        for job_id in job_ids:
            with session_scope(db_url) as s:
                if jobs.claim_job(s, job_id, name, 30):
                    with lock:
                        wins.append((job_id, name))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in wins) == sorted(job_ids)  # each job claimed exactly once


def test_lease_renew_and_cancel(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        jobs.claim_job(s, job.id, "w1", 30)
        assert jobs.renew_lease(s, job.id, "w1", 30)
        assert not jobs.renew_lease(s, job.id, "intruder", 30)
        assert not jobs.is_cancel_requested(s, job.id)
        cancelled = jobs.request_cancel(s, "alice", job.id)
        assert cancelled.status == "cancelling"
        assert jobs.is_cancel_requested(s, job.id)
        assert not jobs.renew_lease(s, job.id, "w1", 30)  # the worker's cue to stop
        assert jobs.finish_job(
            s, job.id, "cancelled", error={"code": "cancelled", "message": "by user"}
        )
        assert jobs.load_job(s, job.id).status == "cancelled"


def test_cancel_queued_and_terminal(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        got = jobs.request_cancel(s, "alice", job.id)
        assert got.status == "cancelled" and got.finished_at is not None
        assert not jobs.claim_job(s, job.id, "w1", 30)  # never starts
        assert jobs.request_cancel(s, "bob", job.id) is None
        done = _job(s)
        jobs.claim_job(s, done.id, "w", 30)
        jobs.finish_job(s, done.id, "succeeded", metrics={"speedup": 2.0})
        again = jobs.request_cancel(s, "alice", done.id)
        assert again.status == "succeeded" and again.metrics == {"speedup": 2.0}
        assert again.progress == 1.0
        assert not jobs.finish_job(s, done.id, "failed")  # terminal is final


def test_requeue_expired_until_attempts_cap(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s, max_attempts=2)
        for attempt in (1, 2):
            assert jobs.claim_job(s, job.id, f"w{attempt}", 0.01)
            later = utcnow() + timedelta(seconds=5)
            requeued = jobs.requeue_expired(s, later)
            got = jobs.load_job(s, job.id)
            if attempt == 1:
                assert requeued == [job.id] and got.status == "queued" and got.worker_id is None
            else:
                assert requeued == [] and got.status == "failed"
                assert got.error_code == jobs.LEASE_LOST and got.finished_at is not None
        assert not jobs.claim_job(s, job.id, "w3", 30)
        kinds = [e.kind for e in jobs.list_events(s, job.id)]
        assert kinds == ["requeued", "log"]


def test_requeue_leaves_live_leases(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        jobs.claim_job(s, job.id, "w1", 60)
        assert jobs.requeue_expired(s) == []
        assert jobs.load_job(s, job.id).status == "running"


def test_events_seq_monotonic_under_threads(db_url: str) -> None:
    with session_scope(db_url) as s:
        job = _job(s)

    def writer(n: int) -> None:
        for i in range(10):
            with session_scope(db_url) as s2:
                jobs.add_event(s2, job.id, "log", {"writer": n, "i": i})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope(db_url) as s:
        events = jobs.list_events(s, job.id)
        assert [e.seq for e in events] == list(range(1, 31))
        assert [e.seq for e in jobs.list_events(s, job.id, after=27)] == [28, 29, 30]
        assert len(jobs.list_events(s, job.id, after=0, limit=5)) == 5


def test_progress_and_delete(db_url: str, tmp_path: Path) -> None:
    with session_scope(db_url) as s:
        job = _job(s)
        jobs.claim_job(s, job.id, "w", 30)
        jobs.set_progress(s, job.id, "training", 1.7)
        got = jobs.load_job(s, job.id)
        assert (got.phase, got.progress) == ("training", 1.0)
        jobs.add_event(s, job.id, "phase", {"phase": "training"})
        jobs.record_artifact(s, job.id, "report.json", 3, "a" * 64)
        jobs.record_artifact(s, job.id, "report.json", 4, "b" * 64)  # retried attempt replaces
        assert [(a.size, a.sha256) for a in jobs.list_artifacts(s, [job.id])[job.id]] == [
            (4, "b" * 64)
        ]
        with pytest.raises(jobs.JobBusy):
            jobs.delete_job(s, "alice", job.id)
        jobs.finish_job(s, job.id, "failed", error={"code": "bad_weights", "message": "nope"})
        assert not jobs.delete_job(s, "bob", job.id)
        assert jobs.delete_job(s, "alice", job.id)
        assert jobs.load_job(s, job.id) is None
        assert (
            jobs.list_events(s, job.id) == []
            and jobs.get_artifact(s, job.id, "report.json") is None
        )


def test_count_by_status(db_url: str) -> None:
    with session_scope(db_url) as s:
        a, _ = _job(s), _job(s)
        jobs.claim_job(s, a.id, "w", 30)
        assert jobs.count_by_status(s) == {"queued": 1, "running": 1}


def test_api_keys(db_url: str) -> None:
    with session_scope(db_url) as s:
        plain = keys.create_key(s, "alice", "laptop")
        assert plain.startswith("hwd_") and len(plain) > 40
        assert keys.resolve_key(s, plain) == "alice"
        assert keys.resolve_key(s, plain + "x") is None and keys.resolve_key(s, "nope") is None
        [row] = keys.list_keys(s, "alice")
        assert row.key_hash != plain and plain not in (row.prefix, row.key_hash)
        assert keys.revoke_key(s, row.prefix)
        assert keys.resolve_key(s, plain) is None
        assert not keys.revoke_key(s, row.id)


def test_models_and_latency_tables(db_url: str) -> None:
    with session_scope(db_url) as s:
        m = create_model(
            s,
            model_id="c" * 32,
            owner="alice",
            filename="w.safetensors",
            format="safetensors",
            size=10,
            sha256="d" * 64,
            path="/x",
        )
        assert get_model(s, "alice", m.id).filename == "w.safetensors"
        assert get_model(s, "bob", m.id) is None
        assert get_latency_table(s, "k") is None
        put_latency_table(s, "k", b"\x00\x01", device="cpu", meta={"entries": 3})
        put_latency_table(s, "k", b"\x02", device="cpu")
        assert get_latency_table(s, "k") == b"\x02"


def test_artifact_store_atomic_write_and_validation(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    job_id = "a" * 32
    data = b"x" * 3_000_000
    size, sha = store.write(job_id, "pruned.safetensors", data)
    path = store.path(job_id, "pruned.safetensors")
    assert path.read_bytes() == data and (size, sha) == file_sha256(path)
    src = tmp_path / "r.json"
    src.write_bytes(b"{}")
    assert store.write(job_id, "report.json", src)[0] == 2
    assert store.write(job_id, "report.html", io.BytesIO(b"<p>"))[0] == 3
    with store.open(job_id, "report.html") as fh:
        assert fh.read() == b"<p>"
    for bad_name in ("../x", "notes.txt", "a/report.json"):
        with pytest.raises(ValueError, match="unknown artifact name"):
            store.path(job_id, bad_name)
    for bad_id in ("../../etc", "A" * 32, "a" * 31):
        with pytest.raises(ValueError, match="invalid job id"):
            store.path(bad_id, "report.json")
    assert sorted(p.name for p in store.job_dir(job_id).iterdir()) == [
        "pruned.safetensors",
        "report.html",
        "report.json",
    ]  # no temporary files left
    store.delete_job(job_id)
    assert not store.job_dir(job_id).exists()


def test_save_upload_cap_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    path, size, _ = store.save_upload("weights", io.BytesIO(b"abc"), max_bytes=3, suffix=".pt")
    assert path.read_bytes() == b"abc" and size == 3 and path.suffix == ".pt"
    assert store.is_upload(path)
    with pytest.raises(UploadTooLarge):
        store.save_upload("weights", io.BytesIO(b"abcd"), max_bytes=3)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    store.delete_upload(path)
    assert not path.exists()


def test_concurrent_first_upgrades_of_one_sqlite_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from hawada.store.db import init_db; init_db({url!r})"
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with session_scope(url) as s:
        assert jobs.list_jobs(s, "x") == ([], None)


def test_timestamps_are_utc_aware(db_url: str) -> None:
    with session_scope(db_url) as s:
        job_id = _job(s).id
    with session_scope(db_url) as s:
        job = jobs.load_job(s, job_id)
        assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
        assert abs((utcnow() - job.created_at).total_seconds()) < 60
