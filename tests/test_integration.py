"""End to end over real HTTP against a real Celery worker subprocess, in two set-ups:

- embedded: `hawada serve` (SQLite + filesystem broker in a temporary var dir);
- services: `hawada api` + `hawada worker` on Redis (a free database index) and PostgreSQL
  (a schema of its own), skipped when either server is unreachable.

Each set-up runs a tiny job to success and checks what a user gets (artifacts with matching
sha256, a loadable plain torchvision model whose parameter count matches the report, events
in phase order), cancels a long job in training, and fails a job given another arch's weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from services import Service, base_env, child_pids, tiny_recipe

from hawada.client.client import HawadaAPIError
from hawada.lifecycle import PHASES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("HAWADA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
PG_URL = os.environ.get("HAWADA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _redis_db() -> tuple[Any, int]:
    """A connection to an empty Redis database index (skip when Redis is unreachable)."""
    redis = pytest.importorskip("redis")
    for index in range(15, 0, -1):
        conn = redis.Redis.from_url(f"{REDIS_URL}/{index}", socket_connect_timeout=2)
        try:
            if conn.dbsize() == 0 and conn.set("hawada-test-lock", "1", nx=True, ex=3600):
                return conn, index
        except redis.exceptions.ConnectionError as exc:
            pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    pytest.skip("no empty Redis database index")


@pytest.fixture(scope="module", params=["embedded", "redis-postgres"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A running service of the requested kind (module scope: started once per kind)."""
    var_dir = tmp_path_factory.mktemp(request.param)
    env = base_env(var_dir)
    conn = None
    if request.param == "redis-postgres":
        conn, index = _redis_db()
        env["HAWADA_BROKER_URL"] = f"{REDIS_URL}/{index}"
        env["HAWADA_DATABASE_URL"] = request.getfixturevalue("pg_schema_url")
    svc = Service(env, var_dir, embedded=request.param == "embedded")
    try:
        yield svc
    finally:
        svc.stop()
        if conn is not None:
            conn.flushdb()
            conn.close()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Randomly initialised ResNet-18 (CIFAR stem, 10 classes) weights as safetensors."""
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model

    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(build_model("resnet18", num_classes=10, stem="cifar").state_dict(), str(path))
    return path


def _wait(svc: Service, job_id: str, timeout: float = 240.0) -> dict[str, Any]:
    try:
        return svc.client.wait(job_id, poll_s=0.5, timeout=timeout)
    except TimeoutError:
        pytest.fail(f"job {job_id} did not finish in {timeout} s\n{svc.tail()}")


def test_job_runs_to_success_and_artifacts_load(
    service: Service, weights: Path, tmp_path: Path
) -> None:
    import torch

    from hawada.adapters.torchvision import load_pruned

    job = service.client.submit(tiny_recipe(), weights, idempotency_key=uuid.uuid4().hex)
    assert job["status"] == "queued"
    job = _wait(service, job["id"])
    assert job["status"] == "succeeded", f"{job.get('error')}\n{service.tail()}"

    names = {a["name"] for a in job["artifacts"]}
    assert {
        "pruned.json",
        "pruned.safetensors",
        "report.json",
        "keepall.safetensors",
        "gates.safetensors",
        "report.html",
    } <= names
    for name in ("pruned.json", "pruned.safetensors", "report.json"):
        path = service.client.download(job["id"], name, tmp_path)
        listed = next(a for a in job["artifacts"] if a["name"] == name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed["sha256"]
        assert path.stat().st_size == listed["size"]

    report = json.loads((tmp_path / "report.json").read_text())
    model = load_pruned(tmp_path / "pruned.json", tmp_path / "pruned.safetensors").eval()
    assert type(model).__module__.startswith("torchvision.models")
    assert sum(p.numel() for p in model.parameters()) == report["pruned"]["params"]
    assert report["pruned"]["flops"] <= 0.5 * report["baseline"]["flops"] * 1.001
    with torch.no_grad():
        out = model(torch.rand(4, 3, 16, 16))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert job["metrics"]["pruned"]["params"] == report["pruned"]["params"]

    phases = [e["data"]["phase"] for e in service.client.events(job["id"]) if e["kind"] == "phase"]
    assert phases == sorted(phases, key=PHASES.index), phases
    assert set(PHASES) - {"finetuning"} <= set(phases), phases


def test_cancel_while_training_ends_quickly(service: Service, weights: Path) -> None:
    job = service.client.submit(tiny_recipe(train={"steps": 100000, "log_every": 1}), weights)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        current = service.client.get(job["id"])
        if current["phase"] == "training" and current["progress"] > 0:
            break
        assert current["status"] in ("queued", "running"), f"{current}\n{service.tail()}"
        time.sleep(0.3)
    else:
        pytest.fail(f"job never reached training\n{service.tail()}")
    asked = time.monotonic()
    assert service.client.cancel(job["id"])["status"] in ("cancelling", "cancelled")
    while service.client.get(job["id"])["status"] not in ("cancelled", "failed", "succeeded"):
        assert time.monotonic() - asked < 15, f"not cancelled after 15 s\n{service.tail()}"
        time.sleep(0.2)
    final = service.client.get(job["id"])
    assert final["status"] == "cancelled" and time.monotonic() - asked < 15
    assert final["artifacts"] == []


@pytest.fixture(scope="module")
def weights_pt(weights: Path) -> Path:
    """The same weights as a torch.save state dict (shapes are checked by the worker)."""
    import torch
    from safetensors.torch import load_file

    path = weights.with_suffix(".pt")
    torch.save(load_file(str(weights)), path)
    return path


def test_weights_of_another_arch_fail_with_weights_mismatch(
    service: Service, weights: Path, weights_pt: Path
) -> None:
    recipe = tiny_recipe(model={"arch": "resnet34"})
    # .safetensors: refused at submission (the API reads the header's shapes), nothing queued.
    with pytest.raises(HawadaAPIError) as refused:
        service.client.submit(recipe, weights)
    assert refused.value.status == 422 and refused.value.code == "weights_mismatch"
    # .pt: the worker finds the mismatch when it loads the state dict.
    job = _wait(service, service.client.submit(recipe, weights_pt)["id"], timeout=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "weights_mismatch", job["error"]
    assert job["artifacts"] == []


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_torch_lives_only_in_the_worker_child(service: Service, weights_pt: Path) -> None:
    """The API and the Celery parent never load torch; the child that ran jobs does."""
    # Make sure at least one job has run in this service's worker child.
    recipe = tiny_recipe(model={"arch": "resnet34"})
    _wait(service, service.client.submit(recipe, weights_pt)["id"])
    if len(service.procs) == 1:  # embedded: serve (API) -> celery parent -> child
        api_pid = service.procs[0].pid
        parents = [
            p for p in child_pids(api_pid) if "celery" in Path(f"/proc/{p}/cmdline").read_text()
        ]
    else:
        api_pid, parents = service.procs[0].pid, [service.procs[1].pid]
    assert len(parents) == 1
    children = child_pids(parents[0])
    assert children, "prefork pool has no child"
    assert not _loads_torch(api_pid)
    assert not _loads_torch(parents[0])
    assert any(_loads_torch(c) for c in children)


def _kill_tree(pid: int) -> None:
    for child in child_pids(pid):
        _kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_job_of_a_killed_worker_is_requeued_and_completes(tmp_path: Path, weights: Path) -> None:
    """Kill API, worker and job process mid-training; a new `serve` finishes the job."""
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    env = base_env(var_dir)
    env["HAWADA_LEASE_S"] = "3"
    svc = Service(env, var_dir, embedded=True)
    try:
        job_id = svc.client.submit(tiny_recipe(train={"steps": 40, "log_every": 1}), weights)["id"]
        deadline = time.monotonic() + 180
        while svc.client.get(job_id)["phase"] != "training":
            assert time.monotonic() < deadline, svc.tail()
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        svc.client.close()
        _kill_tree(svc.procs[0].pid)  # no clean-up of any kind: like a power cut
        svc.procs[0].wait()
    svc = Service(env, var_dir, embedded=True)
    try:
        job = _wait(svc, job_id)
        assert job["status"] == "succeeded", f"{job}\n{svc.tail()}"
        assert job["attempts"] == 2
        kinds = [e["kind"] for e in svc.client.events(job_id)]
        assert "requeued" in kinds
    finally:
        svc.stop()
