"""Python client for the HawAda HTTP API (httpx only, no torch)."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import httpx

from hawada.lifecycle import TERMINAL_STATES


class HawadaAPIError(Exception):
    """An error answer from the API, carrying its ``{code, message}`` and HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class ChecksumError(Exception):
    """A downloaded artifact's sha256 differs from the one the job lists."""


def _recipe_text(recipe: str | Path | Mapping[str, Any]) -> str:
    """Recipe as text: a mapping becomes JSON, a path is read, other text is sent as is."""
    if isinstance(recipe, Mapping):
        return json.dumps(dict(recipe))
    if isinstance(recipe, Path):
        return recipe.read_text()
    # A short single-line string that names an existing file is a path, anything else is text.
    if "\n" not in recipe and len(recipe) < 4096 and Path(recipe).is_file():
        return Path(recipe).read_text()
    return recipe


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class HawadaClient:
    """Thin typed wrapper over the ``/v1`` routes; every method returns the decoded JSON.

    Errors come back as :class:`HawadaAPIError` with the API's ``code`` and ``message``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    # -- plumbing -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> HawadaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.is_success:
            return
        code, message = "http_error", resp.text[:500] or resp.reason_phrase
        try:
            err = resp.json().get("error", {})
            code, message = err.get("code", code), err.get("message", message)
        except (ValueError, AttributeError):
            pass  # not our JSON error envelope (proxy page, etc.): keep the raw text
        raise HawadaAPIError(resp.status_code, code, message)

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        resp = self._http.request(method, url, **kw)
        self._raise_for(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    # -- service ------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return self._request("GET", "/healthz")

    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200 (database and broker reachable)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def recipes(self) -> Any:
        """Built-in recipes."""
        return self._request("GET", "/v1/recipes")

    def architectures(self) -> Any:
        """Supported architectures."""
        return self._request("GET", "/v1/architectures")

    # -- models -------------------------------------------------------------------------
    def upload_model(self, weights: str | Path) -> dict[str, Any]:
        """Upload a weights file once; the returned ``id`` can be reused as ``model_id``."""
        path = Path(weights)
        with open(path, "rb") as fh:
            return self._request("POST", "/v1/models", files={"weights": (path.name, fh)})

    def get_model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``."""
        return self._request("GET", f"/v1/models/{model_id}")

    # -- jobs ---------------------------------------------------------------------------
    def submit(
        self,
        recipe: str | Path | Mapping[str, Any],
        weights: str | Path | None = None,
        dataset: str | Path | None = None,
        *,
        model_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a job from a recipe and either a weights file or an uploaded ``model_id``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        text = _recipe_text(recipe)
        if model_id is not None:
            if weights is not None or dataset is not None:
                raise ValueError("model_id submits are JSON only: no weights or dataset file")
            body = {"recipe": text, "model_id": model_id}
            return self._request("POST", "/v1/jobs", json=body, headers=headers)
        if weights is None:
            raise ValueError("pass weights (a file) or model_id")
        with contextlib.ExitStack() as stack:
            wpath = Path(weights)
            files: dict[str, Any] = {"weights": (wpath.name, stack.enter_context(wpath.open("rb")))}
            if dataset is not None:
                dpath = Path(dataset)
                files["dataset"] = (dpath.name, stack.enter_context(dpath.open("rb")))
            return self._request(
                "POST", "/v1/jobs", data={"recipe": text}, files=files, headers=headers
            )

    def get(self, job_id: str) -> dict[str, Any]:
        """One job: status, phase, progress, error, metrics, artifacts."""
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the caller's jobs (newest first), optionally filtered by status."""
        params = {
            k: v
            for k, v in {"status": status, "limit": limit, "cursor": cursor}.items()
            if v is not None
        }
        return self._request("GET", "/v1/jobs", params=params)

    def events(self, job_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        """Events of a job with sequence number above ``after``."""
        body = self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        items = body.get("items", body.get("events", [])) if isinstance(body, dict) else body
        return cast("builtins.list[dict[str, Any]]", items)

    def watch(
        self, job_id: str, *, poll_s: float = 1.0, timeout: float | None = None
    ) -> Iterator[tuple[dict[str, Any], builtins.list[dict[str, Any]]]]:
        """Poll until the job is terminal, yielding ``(job, new_events)`` each round.

        Polling (rather than holding an SSE stream) survives proxies and API restarts.
        Raises ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            new = self.events(job_id, after=after)
            if new:
                after = max(int(e.get("seq", e.get("id", after))) for e in new)
            job = self.get(job_id)
            if job["status"] in TERMINAL_STATES:
                # Events written between the two reads above are still owed to the caller.
                tail = self.events(job_id, after=after)
                yield job, new + tail
                return
            yield job, new
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)

    def wait(
        self, job_id: str, *, poll_s: float = 1.0, timeout: float | None = None
    ) -> dict[str, Any]:
        """Block until the job is terminal and return it."""
        job: dict[str, Any] = {}
        for polled, _ in self.watch(job_id, poll_s=poll_s, timeout=timeout):
            job = polled
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop; a queued job is cancelled at once, a running one winds down."""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def delete(self, job_id: str) -> None:
        """Delete a job and its artifacts."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def download(self, job_id: str, name: str, dest: str | Path, sha256: str | None = None) -> Path:
        """Stream one artifact to ``dest`` (a file, or a folder to put ``name`` in).

        The checksum is verified against ``sha256`` or, when not given, the job's listing;
        on mismatch the partial file is removed and :class:`ChecksumError` raised.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / name
        if sha256 is None:
            listed = {a["name"]: a for a in self.get(job_id).get("artifacts", [])}
            if name not in listed:
                raise HawadaAPIError(404, "not_found", f"job {job_id} has no artifact {name!r}")
            sha256 = listed[name]["sha256"]
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as resp:
            if not resp.is_success:
                resp.read()
                self._raise_for(resp)
            with open(tmp, "wb") as fh:
                for block in resp.iter_bytes(1 << 20):
                    digest.update(block)
                    fh.write(block)
        if digest.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise ChecksumError(f"{name}: sha256 {digest.hexdigest()} != listed {sha256}")
        tmp.replace(dest)
        return dest

    def download_all(self, job_id: str, dest_dir: str | Path) -> builtins.list[Path]:
        """Download every artifact of a job into ``dest_dir`` (checksums verified)."""
        folder = Path(dest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [
            self.download(job_id, a["name"], folder / a["name"], sha256=a["sha256"])
            for a in self.get(job_id).get("artifacts", [])
        ]
