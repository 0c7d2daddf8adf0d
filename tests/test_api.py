"""HTTP API tests on SQLite and PostgreSQL, with an in-memory enqueuer instead of Celery."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pickle
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from weights_files import fitting_safetensors

from hawada.api.main import create_app
from hawada.store import jobs as repo
from hawada.store import keys
from hawada.store.artifacts import ArtifactStore
from hawada.store.db import session_scope

RECIPE: dict[str, Any] = {
    "model": {"arch": "resnet18", "num_classes": 10, "stem": "cifar", "input_size": [3, 16, 16]},
    "data": {"source": "synthetic", "batch_size": 8, "limit": 32},
    "target": {"metric": "flops", "ratio": 0.5},
    "train": {"steps": 2},
    "finetune": {"epochs": 0},
}


def safetensors_bytes() -> bytes:
    """A safetensors file that fits RECIPE's model, built by hand (the API process has no torch)."""
    return fitting_safetensors("resnet18", 10, "cifar")


def torch_zip_bytes() -> bytes:
    """The layout of a torch.save file: a zip with <name>/data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/version", b"3\n")
    return buf.getvalue()


def submit(
    client: TestClient,
    recipe: Any = None,
    weights: bytes | None = None,
    name: str = "w.safetensors",
    headers: dict[str, str] | None = None,
    dataset: tuple[str, bytes] | None = None,
) -> Any:
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe or RECIPE)
    files: dict[str, Any] = {
        "weights": (name, weights if weights is not None else safetensors_bytes())
    }
    if dataset is not None:
        files["dataset"] = dataset
    return client.post("/v1/jobs", data={"recipe": text}, files=files, headers=headers or {})


def uploads(settings: Any) -> list[Path]:
    root = Path(settings.artifacts_dir) / "uploads"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["code"] == code and body["message"]
    return body


def test_submit_yaml_multipart_queues_and_enqueues(
    client: TestClient, enqueued: Any, settings: Any
) -> None:
    resp = submit(client)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["error"] is None
    assert job["recipe"]["model"]["arch"] == "resnet18" and job["artifacts"] == []
    assert enqueued.job_ids == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    [stored] = uploads(settings)
    assert stored.read_bytes() == safetensors_bytes()


def test_submit_json_recipe_text_and_pt_zip(client: TestClient, enqueued: Any) -> None:
    resp = submit(client, json.dumps(RECIPE), torch_zip_bytes(), name="model.pth")
    assert resp.status_code == 202, resp.text
    assert resp.json()["recipe"]["target"]["ratio"] == 0.5


def test_malformed_recipe_names_the_field(client: TestClient, enqueued: Any, settings: Any) -> None:
    bad = json.loads(json.dumps(RECIPE))
    bad["target"]["ratio"] = 2.0
    body = assert_error(submit(client, bad), 422, "invalid_recipe")
    assert "target.ratio" in body["message"]
    assert any(d["path"] == "target.ratio" for d in body["details"])
    bad = json.loads(json.dumps(RECIPE))
    bad["gates"] = {"round_tp": 8}
    assert "gates.round_tp" in assert_error(submit(client, bad), 422, "invalid_recipe")["message"]
    assert_error(submit(client, "model: [unclosed"), 422, "invalid_recipe")
    assert enqueued.job_ids == [] and uploads(settings) == []


def test_unknown_arch_is_422(client: TestClient) -> None:
    bad = json.loads(json.dumps(RECIPE))
    bad["model"]["arch"] = "alexnet_9000"
    assert "model.arch" in assert_error(submit(client, bad), 422, "invalid_recipe")["message"]


def test_unsupported_torchvision_arch_is_422_naming_the_reason(client: TestClient) -> None:
    bad = json.loads(json.dumps(RECIPE))
    bad["model"]["arch"] = "vit_b_16"
    message = assert_error(submit(client, bad), 422, "invalid_recipe")["message"]
    assert "vit_b_16" in message and "not supported" in message and "transformer" in message


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("w.safetensors", b"this is not a safetensors file at all"),
        ("w.safetensors", struct.pack("<Q", 10**6) + b"{}"),  # header longer than the file
        ("w.safetensors", struct.pack("<Q", 2) + b"[]"),
        ("w.pt", pickle.dumps({"weight": [1.0, 2.0]})),  # legacy raw pickle: never unpickled
        ("w.pth", b"PK\x03\x04 truncated zip"),
        ("w.bin", b"anything"),
    ],
)
def test_bad_weights_rejected_and_nothing_kept(
    client: TestClient, enqueued: Any, settings: Any, name: str, payload: bytes
) -> None:
    assert_error(submit(client, weights=payload, name=name), 400, "bad_weights")
    assert enqueued.job_ids == [] and uploads(settings) == []
    assert client.get("/v1/jobs").json()["items"] == []


def test_oversized_upload_is_413(tmp_path: Path, settings: Any) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 64})
    with TestClient(create_app(small, enqueue=lambda _id: None)) as client:
        assert_error(
            submit(client, weights=safetensors_bytes() + b"\x00" * 100), 413, "upload_too_large"
        )
        assert uploads(small) == []
        assert client.get("/v1/jobs").json()["items"] == []


def test_bad_dataset_and_missing_parts(client: TestClient, settings: Any) -> None:
    assert_error(submit(client, dataset=("d.npz", b"not a zip")), 400, "bad_dataset")
    assert uploads(settings) == []  # the weights saved before the dataset went too
    resp = client.post("/v1/jobs", data={"recipe": yaml.safe_dump(RECIPE)})
    assert "weights" in assert_error(resp, 422, "invalid_request")["message"]
    resp = client.post("/v1/jobs", files={"weights": ("w.safetensors", safetensors_bytes())})
    assert "recipe" in assert_error(resp, 422, "invalid_request")["message"]
    assert_error(
        client.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(
        client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"}),
        400,
        "bad_request",
    )
    assert_error(client.post("/v1/jobs", json={"recipe": RECIPE}), 422, "invalid_request")


def test_idempotency_key(client: TestClient, enqueued: Any, settings: Any) -> None:
    first = submit(client, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 202
    again = submit(client, headers={"Idempotency-Key": "abc"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert enqueued.job_ids == [first.json()["id"]]
    assert len(uploads(settings)) == 1  # the replay's copy was dropped
    other = json.loads(json.dumps(RECIPE))
    other["target"]["ratio"] = 0.3
    assert_error(
        submit(client, other, headers={"Idempotency-Key": "abc"}), 409, "idempotency_conflict"
    )
    assert_error(
        submit(client, weights=torch_zip_bytes(), name="w.pt", headers={"Idempotency-Key": "abc"}),
        409,
        "idempotency_conflict",
    )
    assert len(uploads(settings)) == 1


def test_unknown_job_and_route_are_json_404(client: TestClient) -> None:
    for path in (
        "/v1/jobs/" + "0" * 32,
        "/v1/jobs/not-an-id",
        "/v1/jobs/" + "0" * 32 + "/events",
        "/v1/jobs/" + "0" * 32 + "/artifacts/report.json",
        "/v1/models/" + "0" * 32,
    ):
        assert client.get(path).json()["error"]["code"].endswith("not_found")
        assert client.get(path).status_code == 404
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.post("/v1/jobs/" + "0" * 32 + "/cancel"), 404, "job_not_found")
    assert_error(client.delete("/v1/jobs/" + "0" * 32), 404, "job_not_found")
    assert_error(client.put("/healthz"), 405, "method_not_allowed")


def test_auth_owner_scoping(settings: Any, enqueued: Any) -> None:
    secured = settings.model_copy(update={"auth_required": True})
    with TestClient(create_app(secured, enqueue=enqueued)) as client:
        with session_scope(secured.database_url) as s:
            alice, bob = keys.create_key(s, "alice"), keys.create_key(s, "bob")
            revoked = keys.create_key(s, "carol")
            keys.revoke_key(s, keys.list_keys(s, "carol")[0].id)
        assert_error(client.get("/v1/jobs"), 401, "unauthorized")
        assert_error(
            client.get("/v1/jobs", headers={"Authorization": "Bearer hwd_wrong"}),
            401,
            "unauthorized",
        )
        assert_error(
            client.get("/v1/jobs", headers={"Authorization": f"Bearer {revoked}"}),
            401,
            "unauthorized",
        )
        assert_error(submit(client), 401, "unauthorized")
        as_alice = {"Authorization": f"Bearer {alice}"}
        as_bob = {"Authorization": f"Bearer {bob}"}
        job = submit(client, headers=as_alice).json()
        assert client.get(f"/v1/jobs/{job['id']}", headers=as_alice).status_code == 200
        assert_error(client.get(f"/v1/jobs/{job['id']}", headers=as_bob), 404, "job_not_found")
        assert_error(
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=as_bob), 404, "job_not_found"
        )
        assert_error(client.delete(f"/v1/jobs/{job['id']}", headers=as_bob), 404, "job_not_found")
        assert client.get("/v1/jobs", headers=as_bob).json()["items"] == []
        assert client.get("/healthz").status_code == 200  # infrastructure needs no key


def test_list_pagination(client: TestClient) -> None:
    ids = {submit(client).json()["id"] for _ in range(5)}
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and set(seen) == ids
    assert len(client.get("/v1/jobs", params={"status": "queued"}).json()["items"]) == 5
    assert client.get("/v1/jobs", params={"status": "running"}).json()["items"] == []
    assert_error(client.get("/v1/jobs", params={"status": "bogus"}), 422, "invalid_request")
    assert_error(client.get("/v1/jobs", params={"cursor": "!!"}), 400, "invalid_cursor")
    assert_error(client.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request")


def _run_with_events(settings: Any, job_id: str, finish: bool = True) -> None:
    with session_scope(settings.database_url) as s:
        assert repo.claim_job(s, job_id, "w1", 30)
        for phase in ("loading", "baseline", "training"):
            repo.add_event(s, job_id, "phase", {"kind": "phase", "phase": phase})
        repo.add_event(s, job_id, "progress", {"phase": "training", "progress": 0.5, "step": 3})
        repo.set_progress(s, job_id, "training", 0.5)
        if finish:
            repo.finish_job(s, job_id, "succeeded", metrics={"speedup": 1.8})


def test_events_after(client: TestClient, settings: Any) -> None:
    job_id = submit(client).json()["id"]
    _run_with_events(settings, job_id, finish=False)
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert (running["status"], running["phase"], running["progress"], running["attempts"]) == (
        "running",
        "training",
        0.5,
        1,
    )
    items = client.get(f"/v1/jobs/{job_id}/events").json()["items"]
    assert [e["seq"] for e in items] == [1, 2, 3, 4]
    assert [e["data"].get("phase") for e in items[:3]] == ["loading", "baseline", "training"]
    after = client.get(f"/v1/jobs/{job_id}/events", params={"after": 2}).json()["items"]
    assert [(e["seq"], e["kind"]) for e in after] == [(3, "phase"), (4, "progress")]


def test_events_sse_stream(client: TestClient, settings: Any) -> None:
    job_id = submit(client).json()["id"]
    _run_with_events(settings, job_id)
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    blocks = [b for b in text.split("\n\n") if b.startswith("id:")]
    first = dict(line.split(": ", 1) for line in blocks[0].splitlines())
    assert (
        first["id"] == "1"
        and first["event"] == "phase"
        and json.loads(first["data"])["phase"] == "loading"
    )
    assert len(blocks) == 4 and "event: end" in text  # stream ends with the finished job
    with client.stream(
        "GET",
        f"/v1/jobs/{job_id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": "3"},
    ) as resp:
        resumed = [b for b in "".join(resp.iter_text()).split("\n\n") if b.startswith("id:")]
    assert [b.splitlines()[0] for b in resumed] == ["id: 4"]


def test_cancel(client: TestClient, settings: Any) -> None:
    queued = submit(client).json()["id"]
    resp = client.post(f"/v1/jobs/{queued}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelled"
    assert_error(client.post(f"/v1/jobs/{queued}/cancel"), 409, "job_finished")
    running = submit(client).json()["id"]
    _run_with_events(settings, running, finish=False)
    resp = client.post(f"/v1/jobs/{running}/cancel")
    assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
    with session_scope(settings.database_url) as s:
        assert repo.is_cancel_requested(s, running)


def _finished_with_artifact(client: TestClient, settings: Any, payload: bytes) -> tuple[str, str]:
    job_id = submit(client).json()["id"]
    _run_with_events(settings, job_id)
    size, sha = ArtifactStore(settings.artifacts_dir).write(job_id, "pruned.safetensors", payload)
    with session_scope(settings.database_url) as s:
        repo.record_artifact(s, job_id, "pruned.safetensors", size, sha)
    return job_id, sha


def test_artifact_download(client: TestClient, settings: Any) -> None:
    payload = bytes(range(256)) * 4000
    job_id, sha = _finished_with_artifact(client, settings, payload)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (
        job["status"] == "succeeded" and job["metrics"] == {"speedup": 1.8} and job["progress"] == 1
    )
    [art] = job["artifacts"]
    assert art == {
        "name": "pruned.safetensors",
        "size": len(payload),
        "sha256": sha,
        "url": f"/v1/jobs/{job_id}/artifacts/pruned.safetensors",
    }
    resp = client.get(art["url"])
    assert resp.status_code == 200 and resp.content == payload
    assert int(resp.headers["content-length"]) == len(payload)
    assert resp.headers["x-checksum-sha256"] == sha == hashlib.sha256(resp.content).hexdigest()
    assert resp.headers["etag"].strip('"') == sha
    assert_error(client.get(f"/v1/jobs/{job_id}/artifacts/report.json"), 404, "artifact_not_found")
    escape = client.get(f"/v1/jobs/{job_id}/artifacts/..%2F..%2Fhawada.db")
    assert escape.status_code == 404 and escape.json()["error"]["code"].endswith("not_found")
    assert_error(client.get(f"/v1/jobs/{job_id}/artifacts/secrets.txt"), 404, "artifact_not_found")


def test_delete_removes_files(client: TestClient, settings: Any) -> None:
    job_id, _ = _finished_with_artifact(client, settings, b"abc")
    art_dir = ArtifactStore(settings.artifacts_dir).job_dir(job_id)
    assert art_dir.is_dir() and len(uploads(settings)) == 1
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert not art_dir.exists() and uploads(settings) == []
    assert_error(client.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
    running = submit(client).json()["id"]
    _run_with_events(settings, running, finish=False)
    assert_error(client.delete(f"/v1/jobs/{running}"), 409, "job_running")


def test_models_reused_by_json_jobs(client: TestClient, enqueued: Any, settings: Any) -> None:
    resp = client.post(
        "/v1/models",
        files={"weights": ("r18.safetensors", safetensors_bytes())},
        data={"arch": "resnet18"},
    )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["size"] == len(safetensors_bytes())
    assert model["sha256"] == hashlib.sha256(safetensors_bytes()).hexdigest()
    assert client.get(f"/v1/models/{model['id']}").json()["filename"] == "r18.safetensors"
    job = client.post("/v1/jobs", json={"recipe": RECIPE, "model_id": model["id"]})
    assert job.status_code == 202, job.text
    assert job.json()["model_id"] == model["id"] and enqueued.job_ids == [job.json()["id"]]
    assert (
        client.post(
            "/v1/jobs", json={"recipe": yaml.safe_dump(RECIPE), "model_id": model["id"]}
        ).status_code
        == 202
    )
    assert_error(
        client.post("/v1/jobs", json={"recipe": RECIPE, "model_id": "f" * 32}),
        404,
        "model_not_found",
    )
    client.post(f"/v1/jobs/{job.json()['id']}/cancel")
    assert client.delete(f"/v1/jobs/{job.json()['id']}").status_code == 204
    assert len(uploads(settings)) == 1  # the model outlives jobs that used it
    assert_error(
        client.post("/v1/models", files={"weights": ("x.pt", b"junk")}), 400, "bad_weights"
    )
    assert_error(
        client.post(
            "/v1/models",
            files={"weights": ("x.safetensors", safetensors_bytes())},
            data={"arch": "lenet"},
        ),
        422,
        "unsupported_arch",
    )
    assert len(uploads(settings)) == 1


def test_enqueue_failure_is_503_and_job_failed(settings: Any) -> None:
    def broken(_job_id: str) -> None:
        raise ConnectionError("broker down")

    with TestClient(create_app(settings, enqueue=broken)) as client:
        assert_error(submit(client), 503, "broker_unavailable")
        [job] = client.get("/v1/jobs").json()["items"]
        assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"


def test_health_ready_metrics_openapi(client: TestClient, settings: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    job_id, _ = _finished_with_artifact(client, settings, b"x")
    submit(client)
    text = client.get("/metrics").text
    assert (
        'hawada_jobs{state="queued"} 1.0' in text and 'hawada_jobs{state="succeeded"} 1.0' in text
    )
    assert 'hawada_phase_duration_seconds_count{phase="training"} 1.0' in text
    assert 'hawada_phase_duration_seconds_count{phase="loading"} 1.0' in text
    client.get(f"/v1/jobs/{job_id}")
    text = client.get("/metrics").text
    labels = 'method="GET",route="/v1/jobs/{job_id}",status="200"'
    assert f"hawada_http_request_duration_seconds_count{{{labels}}} 1.0" in text
    assert 'hawada_phase_duration_seconds_count{phase="training"} 1.0' in text  # not counted twice
    spec = client.get("/openapi.json").json()
    assert {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/models",
        "/v1/recipes",
        "/v1/architectures",
    } <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]


def test_readyz_reports_failed_broker(settings: Any) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down, enqueue=lambda _id: None)) as client:
        body = assert_error(client.get("/readyz"), 503, "not_ready")
        assert body["message"] == "not ready: broker down"
        assert body["details"] == [{"path": "broker", "message": "down"}]


def test_catalog(client: TestClient) -> None:
    body = client.get("/v1/architectures").json()
    archs = {a["name"]: a for a in body["items"]}
    assert archs["resnet18"]["family"] == "resnet"
    assert {"mobilenet_v3_small", "efficientnet_b0", "vgg11_bn", "densenet121"} <= set(archs)
    first = archs["mobilenet_v3_small"]["groups"][0]
    assert first["channels"] == 16 and first["modules"][:2] == ["features.0.0", "features.0.1"]
    unsupported = {a["name"]: a["reason"] for a in body["unsupported"]}
    assert "vit_b_16" in unsupported and "transformer" in unsupported["vit_b_16"]
    assert not set(unsupported) & set(archs)
    recipes = {r["name"]: r["recipe"] for r in client.get("/v1/recipes").json()["items"]}
    assert recipes and all("model" in r and "target" in r for r in recipes.values())


def test_settings_defaults_and_production_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from hawada.settings import Settings, get_settings, reset_settings

    for name in (
        "HAWADA_DATABASE_URL",
        "HAWADA_ARTIFACTS_DIR",
        "HAWADA_LUT_DIR",
        "HAWADA_AUTH_REQUIRED",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HAWADA_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("HAWADA_LEASE_S", "12")
    reset_settings()
    s = get_settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'hawada.db'}"
    assert (s.artifacts_dir, s.lut_dir, s.lease_s) == (
        tmp_path / "artifacts",
        tmp_path / "lut",
        12.0,
    )
    assert s.broker_dir == tmp_path / "broker" / "queue" and get_settings() is s
    monkeypatch.setenv("HAWADA_LEASE_S", "30")
    reset_settings()
    assert get_settings().lease_s == 30.0
    reset_settings()
    with pytest.raises(ValidationError, match="auth_required"):
        Settings(environment="production", database_url="postgresql+psycopg://db/x")
    with pytest.raises(ValidationError, match="SQLite"):
        Settings(environment="production", auth_required=True)
    prod = Settings(
        environment="production", auth_required=True, database_url="postgresql+psycopg://db/x"
    )
    assert prod.auth_required and prod.database_url.startswith("postgresql")


def test_sse_follows_a_live_job_to_its_end(client: TestClient, settings: Any) -> None:
    import threading

    job_id = submit(client).json()["id"]
    _run_with_events(settings, job_id, finish=False)

    def finish_later() -> None:
        time.sleep(0.8)  # the stream has sent the backlog and is polling by now
        with session_scope(settings.database_url) as s:
            repo.add_event(s, job_id, "phase", {"kind": "phase", "phase": "packaging"})
            repo.finish_job(s, job_id, "succeeded")

    threading.Thread(target=finish_later, daemon=True).start()
    start = time.monotonic()
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
        text = "".join(resp.iter_text())
    ids = [line for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [f"id: {n}" for n in range(1, 6)] and text.rstrip().endswith("data: {}")
    assert '"phase": "packaging"' in text and time.monotonic() - start < 10


def test_data_path_outside_data_roots_is_422(
    client: TestClient, enqueued: Any, settings: Any, tmp_path: Path
) -> None:
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"] = {"source": "npz", "path": "/etc/passwd.npz"}
    body = assert_error(submit(client, recipe), 422, "invalid_recipe")
    assert body["details"][0]["path"] == "data.path"
    assert "HAWADA_DATA_ROOTS is not set" in body["message"]  # names the variable to set
    assert enqueued.job_ids == [] and uploads(settings) == []
    # inside a configured root the same recipe is accepted (the worker checks again on load)
    settings.data_roots = [tmp_path / "data", tmp_path / "more"]
    recipe["data"]["path"] = str(tmp_path / "data" / "train.npz")
    assert submit(client, recipe).status_code == 202
    recipe["data"]["path"] = str(tmp_path / "data" / ".." / "elsewhere.npz")
    body = assert_error(submit(client, recipe), 422, "invalid_recipe")
    roots = f"HAWADA_DATA_ROOTS: {tmp_path / 'data'}, {tmp_path / 'more'}"
    assert roots in body["message"]  # the variable and the roots configured
    # the held-out path is confined the same way
    recipe["data"]["path"] = str(tmp_path / "data" / "train.npz")
    recipe["data"]["heldout_path"] = "/srv/other/heldout.npz"
    body = assert_error(submit(client, recipe), 422, "invalid_recipe")
    assert [d["path"] for d in body["details"]] == ["data.heldout_path"] and roots in body[
        "message"
    ]


def npz_bytes() -> bytes:
    """A real small .npz (arrays x, y): the API reads its array headers, never the data."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    return buf.getvalue()


def test_four_file_parts_recipe_weights_dataset_heldout(
    client: TestClient, enqueued: Any, settings: Any
) -> None:
    # `curl -F recipe=@r.yaml -F weights=@m.pt -F dataset=@d.npz -F heldout=@h.npz`
    recipe = {**RECIPE, "data": {"source": "upload", "batch_size": 8}}
    files = {
        "recipe": ("my.yaml", yaml.safe_dump(recipe).encode()),
        "weights": ("m.pth", torch_zip_bytes()),
        "dataset": ("d.npz", npz_bytes()),
        "heldout": ("h.npz", npz_bytes()),
    }
    resp = client.post("/v1/jobs", files=files)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert resp.json()["recipe"]["data"]["source"] == "upload" and enqueued.job_ids == [job_id]
    with session_scope(settings.database_url) as s:
        job = repo.load_job(s, job_id)
        dataset, heldout, weights = job.dataset_path, job.heldout_path, job.weights_path
    assert dataset and heldout and Path(dataset) != Path(heldout)
    assert sorted(uploads(settings)) == sorted(Path(p) for p in (dataset, heldout, weights))
    assert Path(heldout).read_bytes() == npz_bytes()
    # deleting the job removes every upload it brought
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert uploads(settings) == []


def test_form_parts_that_cannot_be_used_are_refused(client: TestClient, settings: Any) -> None:
    files: dict[str, Any] = {
        "weights": ("w.safetensors", safetensors_bytes()),
        "heldout": ("h.npz", b"not a zip"),
    }
    body = assert_error(
        client.post("/v1/jobs", data={"recipe": yaml.safe_dump(RECIPE)}, files=files),
        400,
        "bad_dataset",
    )
    assert "heldout" in body["message"] and uploads(settings) == []
    # a dataset the recipe would ignore: refused rather than silently unused
    body = assert_error(submit(client, dataset=("d.npz", npz_bytes())), 422, "invalid_request")
    assert "data.source is 'synthetic'" in body["message"] and uploads(settings) == []
    # an .npz held-out set next to a folder source (the worker could not use it)
    folder = {**RECIPE, "data": {"source": "folder", "path": "/data/train"}}
    settings.data_roots = [Path("/data")]
    files["heldout"] = ("h.npz", npz_bytes())
    resp = client.post("/v1/jobs", data={"recipe": yaml.safe_dump(folder)}, files=files)
    assert "data.heldout_path" in assert_error(resp, 422, "invalid_request")["message"]
    assert uploads(settings) == []
    # both a held-out path and a held-out file
    recipe = {**RECIPE, "data": {**RECIPE["data"], "heldout_path": "/data/h"}}
    settings.data_roots = [Path("/data")]
    files["heldout"] = ("h.npz", npz_bytes())
    resp = client.post("/v1/jobs", data={"recipe": yaml.safe_dump(recipe)}, files=files)
    assert "not both" in assert_error(resp, 422, "invalid_request")["message"]
    assert uploads(settings) == []


def test_recipe_without_data_is_422_listing_the_sources(client: TestClient, enqueued: Any) -> None:
    recipe = {k: v for k, v in RECIPE.items() if k != "data"}
    body = assert_error(submit(client, recipe), 422, "invalid_recipe")
    assert body["details"] == [
        {
            "path": "data",
            "message": "field required: set data.source to one of synthetic, digits, mnist-5k, "
            "fashion-mnist, folder, npz, webdataset, upload",
        }
    ]
    assert enqueued.job_ids == []


def test_polls_are_answered_from_a_short_lived_copy(
    settings: Any, enqueued: Any, monkeypatch: Any
) -> None:
    """GET /v1/jobs/{id} may answer from this process's copy for `job_cache_s`: a worker's
    write shows only after that window, this process's own cancel shows at once, and 0 turns
    the copy off (every poll reads the database)."""
    now = [1000.0]
    monkeypatch.setattr("hawada.api.routes.jobs.clock", lambda: now[0])
    app_settings = settings.model_copy(update={"job_cache_s": 0.5})
    with TestClient(create_app(app_settings, enqueue=enqueued)) as client:
        job_id = submit(client).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0
        with session_scope(settings.database_url) as s:  # what a worker does
            assert repo.claim_job(s, job_id, "w1", 60.0)
            repo.set_progress(s, job_id, "training", 0.4)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the copy
        now[0] += 0.6
        assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.4  # window over
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelling"  # at once
        assert_error(client.get("/v1/jobs/" + "0" * 24), 404, "job_not_found")
    off = settings.model_copy(update={"job_cache_s": 0.0})
    with TestClient(create_app(off, enqueue=enqueued)) as client:
        job_id = submit(client).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0
        with session_scope(settings.database_url) as s:
            assert repo.claim_job(s, job_id, "w1", 60.0)
            repo.set_progress(s, job_id, "training", 0.25)
        assert client.get(f"/v1/jobs/{job_id}").json()["progress"] == 0.25


def test_event_streams_share_one_poll(client: TestClient, settings: Any, monkeypatch: Any) -> None:
    """Streams following idle jobs cost one query per poll between them (not one each); a new
    event wakes only the streams whose job has it; an ended or deleted job wakes its streams."""
    import anyio

    from hawada.api.routes import events as ev

    monkeypatch.setattr(ev, "POLL_S", 0.05)
    queries: list[list[str]] = []
    real_heads = ev._heads

    def counted(url: str, ids: list[str]) -> dict[str, tuple[int, bool]]:
        queries.append(sorted(ids))
        return real_heads(url, ids)

    monkeypatch.setattr(ev, "_heads", counted)
    ids = [submit(client).json()["id"] for _ in range(3)]
    for job_id in ids:
        _run_with_events(settings, job_id, finish=False)  # 4 events each, running

    async def scenario() -> None:
        watch = ev.EventWatch(settings.database_url, anyio.CapacityLimiter(2))
        for job_id in ids * 4:  # twelve streams on three jobs
            watch.follow(job_id)
        waits = [watch.wait(job_id, 4, 0.3) for job_id in ids * 4]
        assert await asyncio.gather(*waits) == [False] * 12  # nothing past seq 4
        polls = len(queries)
        assert polls >= 1 and all(q == sorted(ids) for q in queries)  # one query a poll
        with session_scope(settings.database_url) as s:
            repo.add_event(s, ids[0], "log", {"message": "new"})
            repo.finish_job(s, ids[1], "failed", error={"code": "internal", "message": "x"})
        woken = await asyncio.gather(*(watch.wait(j, 4, 1.0) for j in ids))
        assert woken == [True, True, False]
        for job_id in ids * 4:
            watch.unfollow(job_id)
        await asyncio.sleep(0.2)
        assert watch.heads == {}  # nobody follows: the poll stops
        stopped = len(queries)
        await asyncio.sleep(0.2)
        assert len(queries) == stopped

    asyncio.run(scenario())
