"""`HawadaClient` and `AsyncHawadaClient`: inputs, typed errors, following a job (Server-Sent
Events with reconnects, polling as the fallback), waiting with a progress callback, downloads.
Against a real API over HTTP (tests/apiserver.py) or, for transport faults, httpx's MockTransport.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apiserver import FAKE_STEPS, free_port, job_with, tiny_safetensors

from hawada import AsyncHawadaClient, HawadaAPIError, HawadaClient, HawadaConnectionError
from hawada.client.client import ChecksumError, recipe_text

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "model": {"arch": "resnet18", "num_classes": 10, "stem": "cifar", "input_size": [3, 16, 16]},
    "data": {"source": "digits", "limit": 64},
    "target": {"metric": "flops", "ratio": 0.5},
    "train": {"steps": 7},
}
YAML = (
    "model: {arch: resnet18, num_classes: 10, stem: cifar, input_size: [3, 16, 16]}\n"
    "data: {source: digits, limit: 64}\n"
    "target: {metric: flops, ratio: 0.5}\n"
    "train: {steps: 7}\n"
)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return tiny_safetensors(tmp_path / "w.safetensors")


def test_recipe_and_weights_as_paths_bytes_or_files(
    api_server: Any, weights: Path, tmp_path: Path
) -> None:
    rpath = tmp_path / "r.yaml"
    rpath.write_text(YAML)
    blob = weights.read_bytes()
    recipes: list[Any] = [RECIPE, rpath, str(rpath), YAML, YAML.encode(), io.StringIO(YAML)]
    with HawadaClient(api_server.url) as hc, open(weights, "rb") as handle:
        weight_inputs: list[Any] = [weights, str(weights), blob, io.BytesIO(blob), handle]
        jobs = [hc.submit(r, weights) for r in recipes]
        jobs += [hc.submit(RECIPE, w) for w in weight_inputs]
    assert all(j["status"] == "queued" for j in jobs)
    assert len({json.dumps(j["recipe"], sort_keys=True) for j in jobs}) == 1
    assert jobs[0]["recipe"]["train"]["steps"] == 7
    assert len(api_server.enqueued) == len(jobs)


def test_a_missing_path_is_never_sent_as_recipe_text(api_server: Any, weights: Path) -> None:
    with HawadaClient(api_server.url) as hc:
        for recipe in ("recipes/no-such.yaml", Path("no-such.yaml"), "my-recipe"):
            with pytest.raises(FileNotFoundError, match=re.escape(f"file not found: {recipe}")):
                hc.submit(recipe, weights)
        with pytest.raises(FileNotFoundError, match=r"file not found: nope\.safetensors"):
            hc.submit(RECIPE, "nope.safetensors")
    assert api_server.enqueued == []
    assert recipe_text("model: {arch: resnet18}") == "model: {arch: resnet18}"  # text, not a path


def test_api_errors_are_typed(api_server: Any, weights: Path) -> None:
    bad = {**RECIPE, "target": {"metric": "flops", "ratio": 7}}
    with HawadaClient(api_server.url) as hc:
        with pytest.raises(HawadaAPIError) as err:
            hc.submit(bad, weights)
        assert (err.value.status, err.value.code) == (422, "invalid_recipe")
        assert "target.ratio" in err.value.message
        assert any(d.get("path") == "target.ratio" for d in err.value.details)
        with pytest.raises(HawadaAPIError) as err:
            hc.get("0" * 32)
        assert (err.value.status, err.value.code) == (404, "job_not_found")


def test_unreachable_service_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with HawadaClient(url) as hc:
        for call in (lambda: hc.get("x"), lambda: hc.wait("x"), lambda: hc.submit(RECIPE, b"x")):
            with pytest.raises(HawadaConnectionError) as err:
                call()
            assert err.value.url == url and str(err.value).startswith(f"cannot reach {url}")
        assert hc.ready() is False


def test_http_error_without_json_body_is_still_an_api_error() -> None:
    transport = httpx.MockTransport(lambda req: httpx.Response(502, text="Bad Gateway"))
    with (
        HawadaClient("http://proxy.invalid", transport=transport) as hc,
        pytest.raises(HawadaAPIError) as err,
    ):
        hc.get("x")
    assert err.value.status == 502 and "Bad Gateway" in err.value.message


def test_submit_wait_calls_progress_for_every_event(api_server: Any, weights: Path) -> None:
    api_server.worker.outcome = "succeeded"
    api_server.worker.pause_s = 0.02  # events arrive while the stream is open
    seen: list[dict[str, Any]] = []
    with HawadaClient(api_server.url) as hc:
        job = hc.submit(RECIPE, weights, wait=True, progress=seen.append, timeout=60)
        assert job["status"] == "succeeded" and job["metrics"]["target_met"] is True
        assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
        kinds = [e["kind"] for e in seen]
        assert kinds[:2] == ["phase", "phase"] and kinds[-1] == "log"
        steps = [e["data"]["step"] for e in seen if e["kind"] == "progress"]
        assert steps == list(range(1, FAKE_STEPS + 1))
        # The same history from the JSON page and from polling.
        assert hc.events(job["id"]) == seen
        assert list(hc.watch(job["id"], sse=False)) == seen
        with pytest.raises(ValueError, match="wait=True"):
            hc.submit(RECIPE, weights, progress=print)


def test_download_verifies_sha256(api_settings: Any, api_server: Any, weights: Path) -> None:
    from hawada.store.artifacts import ArtifactStore

    job_id = job_with(api_settings, api_server, RECIPE, weights, "succeeded")
    out = api_settings.var_dir / "dl"
    with HawadaClient(api_server.url) as hc:
        assert [p.name for p in hc.download_all(job_id, out)] == ["report.json"]
        ArtifactStore(api_settings.artifacts_dir).path(job_id, "report.json").write_bytes(b"x")
        with pytest.raises(ChecksumError):
            hc.download(job_id, "report.json", out / "again.json")
    assert not (out / "again.json").exists() and not (out / "again.json.part").exists()


# -- transport faults (MockTransport) ---------------------------------------------------------
def _sse(seq: int, kind: str = "progress", **data: Any) -> str:
    payload = json.dumps({"kind": kind, **data, "seq": seq, "created_at": "2026-01-01T00:00:00"})
    return f"id: {seq}\nevent: {kind}\ndata: {payload}\n\n"


class _Drops(httpx.SyncByteStream):
    """A stream that sends some bytes and then breaks like a dropped connection."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            yield chunk.encode()
        raise httpx.ReadError("connection reset")


def test_a_dropped_stream_resumes_after_the_last_event() -> None:
    asked: list[tuple[str, str | None]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        after = req.url.params.get("after")
        asked.append((req.headers.get("accept", ""), after))
        sse = {"content-type": "text/event-stream"}
        if after == "0":
            return httpx.Response(200, headers=sse, stream=_Drops([_sse(1), _sse(2)]))
        assert after == "2", after
        return httpx.Response(200, headers=sse, text=_sse(3) + "event: end\ndata: {}\n\n")

    with HawadaClient("http://svc.invalid", transport=httpx.MockTransport(handler)) as hc:
        events = list(hc.watch("j"))
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[0]["created_at"] == "2026-01-01T00:00:00" and "seq" not in events[0]["data"]
    assert [a for _, a in asked] == ["0", "2"]


def test_a_server_that_does_not_stream_is_polled() -> None:
    polls = {"n": 0}
    history = [
        {"seq": i, "kind": "progress", "created_at": "t", "data": {"step": i}} for i in (1, 2, 3)
    ]

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/events"):
            if "text/event-stream" in req.headers.get("accept", ""):
                return httpx.Response(200, json={"items": []})  # a proxy that ignores Accept
            after = int(req.url.params["after"])
            visible = history[: polls["n"]]
            return httpx.Response(200, json={"items": [e for e in visible if e["seq"] > after]})
        polls["n"] += 1
        return httpx.Response(200, json={"status": "succeeded" if polls["n"] >= 3 else "running"})

    with HawadaClient("http://svc.invalid", transport=httpx.MockTransport(handler)) as hc:
        events = list(hc.watch("j", poll_s=0.0))
    assert [e["seq"] for e in events] == [1, 2, 3]


def test_watch_timeout_raises() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/events"):
            return httpx.Response(200, json={"items": []})
        return httpx.Response(200, json={"status": "running"})

    transport = httpx.MockTransport(handler)
    with HawadaClient("http://svc.invalid", transport=transport) as hc, pytest.raises(TimeoutError):
        list(hc.watch("j", poll_s=0.01, timeout=0.05))


# -- asyncio ------------------------------------------------------------------------------------
def test_async_client_submits_waits_and_downloads(
    api_server: Any, weights: Path, tmp_path: Path
) -> None:
    api_server.worker.outcome = "succeeded"

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]], list[Path]]:
        seen: list[dict[str, Any]] = []

        async def progress(event: dict[str, Any]) -> None:
            seen.append(event)

        async with AsyncHawadaClient(api_server.url) as hc:
            assert "resnet18" in [a["name"] for a in (await hc.architectures())["items"]]
            job = await hc.submit(RECIPE, weights.read_bytes(), wait=True, progress=progress)
            paths = await hc.download_all(job["id"], tmp_path / "out")
            with pytest.raises(HawadaAPIError) as err:
                await hc.get("0" * 32)
            assert err.value.code == "job_not_found"
            assert [e async for e in hc.watch(job["id"], sse=False)] == seen
        return job, seen, paths

    job, seen, paths = asyncio.run(main())
    assert job["status"] == "succeeded"
    assert [e["data"]["step"] for e in seen if e["kind"] == "progress"] == list(
        range(1, FAKE_STEPS + 1)
    )
    assert [p.name for p in paths] == ["report.json"]


def test_async_client_unreachable() -> None:
    async def main() -> None:
        async with AsyncHawadaClient(f"http://127.0.0.1:{free_port()}") as hc:
            await hc.list()

    with pytest.raises(HawadaConnectionError):
        asyncio.run(main())


def test_import_hawada_stays_light() -> None:
    code = (
        "import sys, hawada; light = 'httpx' not in sys.modules and 'torch' not in sys.modules; "
        "from hawada import HawadaClient, AsyncHawadaClient, HawadaAPIError, "
        "HawadaConnectionError; sys.exit(0 if light and 'torch' not in sys.modules else 1)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_submit_sends_dataset_and_heldout_files(
    api_server: Any, api_settings: Any, weights: Path, tmp_path: Path
) -> None:
    import numpy as np

    from hawada.store import jobs as repo
    from hawada.store.db import session_scope

    for name, n in (("train.npz", 12), ("test.npz", 5)):
        np.savez(tmp_path / name, x=np.zeros((n, 8, 8), np.uint8), y=np.arange(n) % 3)
    recipe = {**RECIPE, "data": {"source": "upload"}}
    with HawadaClient(api_server.url) as hc:
        job = hc.submit(recipe, weights, tmp_path / "train.npz", heldout=tmp_path / "test.npz")
        with pytest.raises(ValueError, match="heldout"):
            hc.submit(recipe, model_id="0" * 32, heldout=tmp_path / "test.npz")
    with session_scope(api_settings.database_url) as session:
        row = repo.load_job(session, job["id"])
        assert Path(row.heldout_path).read_bytes() == (tmp_path / "test.npz").read_bytes()
        assert Path(row.dataset_path).read_bytes() == (tmp_path / "train.npz").read_bytes()
