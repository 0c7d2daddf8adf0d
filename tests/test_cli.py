"""The `hawada` command and `HawadaClient` against a real API over HTTP (uvicorn in a thread,
SQLite in tmp, jobs recorded instead of sent to a broker), plus `hawada run` in-process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from hawada.cli import app
from hawada.client.client import ChecksumError, HawadaAPIError, HawadaClient
from hawada.settings import Settings, reset_settings

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _tiny_safetensors(path: Path) -> Path:
    """A valid one-tensor safetensors file (the API checks the header, not the arch)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    return path


class _Server:
    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from hawada.api.main import create_app

        self.enqueued: list[str] = []
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            create_app(settings, enqueue=self.enqueued.append),
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

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Embedded settings under tmp_path, also visible to CLI code through the environment."""
    for key in (
        "HAWADA_DATABASE_URL",
        "HAWADA_ARTIFACTS_DIR",
        "HAWADA_BROKER_URL",
        "HAWADA_URL",
        "HAWADA_API_KEY",
        "HAWADA_LUT_DIR",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HAWADA_VAR_DIR", str(tmp_path / "var"))
    reset_settings()
    yield Settings(var_dir=tmp_path / "var")
    reset_settings()


@pytest.fixture
def server(cfg: Settings) -> Iterator[_Server]:
    srv = _Server(cfg)
    yield srv
    srv.stop()


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text((ROOT / "recipes" / "demo-digits.yaml").read_text())
    return path


def _invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def _finished_job_with_artifact(
    cfg: Settings, server: _Server, recipe_file: Path, tmp_path: Path, payload: bytes
) -> str:
    """Submit over HTTP, then play the worker's part: store an artifact and finish the job."""
    from hawada.store import jobs
    from hawada.store.artifacts import ArtifactStore
    from hawada.store.db import session_scope

    with HawadaClient(server.url) as hc:
        job_id = hc.submit(recipe_file, _tiny_safetensors(tmp_path / "w.safetensors"))["id"]
    size, sha = ArtifactStore(cfg.artifacts_dir).write(job_id, "pruned.json", payload)
    with session_scope(cfg.database_url) as session:
        assert jobs.claim_job(session, job_id, "test-worker", 60)
        jobs.record_artifact(session, job_id, "pruned.json", size, sha)
        jobs.finish_job(session, job_id, "succeeded", metrics={"pruned": {"params": 1}})
    return job_id


def test_submit_status_list_cancel(server: _Server, recipe_file: Path, tmp_path: Path) -> None:
    weights = _tiny_safetensors(tmp_path / "w.safetensors")
    res = _invoke(
        "submit", "--recipe", str(recipe_file), "--weights", str(weights), "--url", server.url
    )
    assert res.exit_code == 0, res.output
    job_id = res.output.strip().splitlines()[-1]
    assert server.enqueued == [job_id]

    res = _invoke("status", job_id, "--url", server.url, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["status"] == "queued"
    res = _invoke("list", "--url", server.url)
    assert res.exit_code == 0 and job_id in res.output
    res = _invoke("cancel", job_id, "--url", server.url)
    assert res.exit_code == 0 and "cancelled" in res.output
    with HawadaClient(server.url) as hc:
        assert hc.get(job_id)["status"] == "cancelled"
        assert hc.list(status="cancelled")["items"][0]["id"] == job_id


def test_errors_carry_the_api_code(server: _Server, recipe_file: Path, tmp_path: Path) -> None:
    res = _invoke("status", "0" * 32, "--url", server.url)
    assert res.exit_code == 1 and "not_found" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: resnet18}\ntarget: {ratio: 7}\n")
    with HawadaClient(server.url) as hc, pytest.raises(HawadaAPIError) as err:
        hc.submit(bad, _tiny_safetensors(tmp_path / "w.safetensors"))
    assert err.value.status in (400, 422) and "target.ratio" in err.value.message


def test_download_verifies_sha256(
    cfg: Settings, server: _Server, recipe_file: Path, tmp_path: Path
) -> None:
    payload = b'{"arch": "resnet18", "channels": {}}'
    job_id = _finished_job_with_artifact(cfg, server, recipe_file, tmp_path, payload)
    out = tmp_path / "out"
    res = _invoke("download", job_id, "--out", str(out), "--url", server.url)
    assert res.exit_code == 0, res.output
    assert (out / "pruned.json").read_bytes() == payload

    # Corrupt the stored file behind the API's back: the client must refuse it.
    from hawada.store.artifacts import ArtifactStore

    ArtifactStore(cfg.artifacts_dir).path(job_id, "pruned.json").write_bytes(b"tampered")
    with HawadaClient(server.url) as hc, pytest.raises(ChecksumError):
        hc.download(job_id, "pruned.json", tmp_path / "again.json")
    assert not (tmp_path / "again.json").exists()
    assert not (tmp_path / "again.json.part").exists()


def test_watch_follows_to_the_end(
    cfg: Settings, server: _Server, recipe_file: Path, tmp_path: Path
) -> None:
    job_id = _finished_job_with_artifact(cfg, server, recipe_file, tmp_path, b"{}")
    res = _invoke("watch", job_id, "--url", server.url)
    assert res.exit_code == 0 and "succeeded" in res.output


def test_catalog_commands(server: _Server) -> None:
    res = _invoke("recipes", "--url", server.url)
    assert res.exit_code == 0 and "demo-digits" in res.output
    res = _invoke("archs", "--url", server.url)
    assert res.exit_code == 0 and "resnet18" in res.output


def test_keys_create_list_revoke(cfg: Settings) -> None:
    res = _invoke("keys", "create", "--owner", "alice", "--name", "laptop")
    assert res.exit_code == 0, res.output
    key = res.output.strip().splitlines()[-1]
    assert key.startswith("hwd_")
    from hawada.store.db import session_scope
    from hawada.store.keys import list_keys, resolve_key

    with session_scope(cfg.database_url) as session:
        assert resolve_key(session, key) == "alice"
        key_id = list_keys(session, owner="alice")[0].id
    res = _invoke("keys", "list", "--owner", "alice")
    assert res.exit_code == 0 and key_id in res.output and key not in res.output
    assert _invoke("keys", "revoke", key_id).exit_code == 0
    with session_scope(cfg.database_url) as session:
        assert resolve_key(session, key) is None
    assert _invoke("keys", "revoke", key_id).exit_code == 1


def test_client_modules_never_import_torch() -> None:
    code = "import sys, hawada.client.cli, hawada.client.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.slow
def test_run_writes_artifacts_in_process(cfg: Settings, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model

    weights = tmp_path / "w.safetensors"
    save_file(build_model("resnet18", num_classes=10, stem="cifar").state_dict(), str(weights))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {
                    "arch": "resnet18",
                    "num_classes": 10,
                    "stem": "cifar",
                    "input_size": [3, 16, 16],
                },
                "data": {"source": "digits", "batch_size": 16, "limit": 96, "val_fraction": 0.25},
                "target": {"metric": "flops", "ratio": 0.5},
                "train": {"steps": 3},
                "finetune": {"epochs": 0},
                "latency": {"batch_size": 2, "repeats": 2, "warmup": 1},
            }
        )
    )
    out = tmp_path / "out"
    res = _invoke(
        "run",
        "--recipe",
        str(recipe),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert "baseline" in res.output and f"{report['pruned']['params']:,}" in res.output
    assert {"pruned.json", "pruned.safetensors", "report.html"} <= {p.name for p in out.iterdir()}


def test_http_error_without_json_body_is_still_an_api_error() -> None:
    transport = httpx.MockTransport(lambda req: httpx.Response(502, text="Bad Gateway"))
    with (
        HawadaClient("http://proxy.invalid", transport=transport) as hc,
        pytest.raises(HawadaAPIError) as err,
    ):
        hc.get("x")
    assert err.value.status == 502 and "Bad Gateway" in err.value.message


def test_unreachable_service_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "hawada.cli", "status", "abc", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert f"cannot reach http://127.0.0.1:{port}/v1/jobs/abc" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
