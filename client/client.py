"""Python client for the HawAda HTTP API (httpx only, no torch).

Two clients with the same methods: :class:`HawadaClient` (blocking) and
:class:`AsyncHawadaClient` (``async``/``await``, for notebooks and asyncio services)::

    from hawada import HawadaClient

    with HawadaClient("http://127.0.0.1:8000") as hc:
        job = hc.submit("recipes/demo-digits.yaml", "baseline.safetensors",
                        wait=True, progress=print)
        if job["status"] == "succeeded":
            hc.download_all(job["id"], "result/")

Every failure is one of three exceptions, all subclasses of :class:`HawadaClientError`:
:class:`HawadaConnectionError` (nothing answered at ``base_url``), :class:`HawadaAPIError`
(the API refused the request; ``status``, ``code``, ``message``, ``details``) and
:class:`ChecksumError` (a download did not match its listed sha256). A file argument that
does not exist raises ``FileNotFoundError("file not found: PATH")`` before anything is sent.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeAlias, cast

import httpx

from hawada.lifecycle import TERMINAL_STATES

#: A recipe: a mapping, a path (``str`` or ``os.PathLike``), recipe text as ``bytes``, a file
#: object, or YAML/JSON text in a ``str`` (a ``str`` is text when it has a newline, starts
#: with ``{`` or holds ``": "``; otherwise it is a path).
RecipeInput: TypeAlias = "Mapping[str, Any] | str | os.PathLike[str] | bytes | IO[Any]"
#: A file to upload: a path (``str`` or ``os.PathLike``), its content as ``bytes``, or a
#: binary file object (its ``name``, when it has one, gives the upload's file name).
FileInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | IO[bytes]"
#: Called with every event of a job while waiting (see docs/events.md).
ProgressCallback: TypeAlias = Callable[[dict[str, Any]], Any]

#: Server-Sent Events: how long to wait for a byte before reconnecting (the API sends a
#: keep-alive comment every 15 s on an idle stream).
SSE_READ_TIMEOUT_S = 45.0
#: Reconnect attempts of one event stream before giving up with HawadaConnectionError.
SSE_RECONNECTS = 5


# -- errors ---------------------------------------------------------------------------------
class HawadaClientError(Exception):
    """Base class of every error the client raises on purpose."""


class HawadaConnectionError(HawadaClientError):
    """Nothing usable answered at the service URL (refused, DNS, timeout, dropped stream).

    ``url`` is the address that was tried, ``reason`` what the transport said.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class HawadaAPIError(HawadaClientError):
    """An error answer from the API: its HTTP ``status``, its ``code`` and ``message``
    (``{"error": {"code", "message", "details"}}``) and ``details`` (a list, e.g. one entry per
    invalid recipe field with its ``path``; empty when the API gave none)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: builtins.list[Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details or [])


class ChecksumError(HawadaClientError):
    """A downloaded artifact's sha256 differs from the one the job lists (nothing is kept)."""


# -- inputs ---------------------------------------------------------------------------------
def _looks_like_text(value: str) -> bool:
    return "\n" in value or value.lstrip().startswith("{") or ": " in value


def _read_path(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {p}") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"not a file: {p}") from None


def recipe_text(recipe: RecipeInput) -> str:
    """The recipe as the text the API receives (a mapping becomes JSON).

    A ``str`` with a newline, a leading ``{`` or a ``": "`` is recipe text; any other ``str``
    is a path, and a missing path raises ``FileNotFoundError`` (it is never sent as text).
    """
    if isinstance(recipe, Mapping):
        return json.dumps(dict(recipe))
    if isinstance(recipe, (bytes, bytearray)):
        return bytes(recipe).decode("utf-8")
    if isinstance(recipe, str) and _looks_like_text(recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return _read_path(recipe).decode("utf-8")
    if hasattr(recipe, "read"):
        content = recipe.read()
        return content.decode("utf-8") if isinstance(content, bytes) else str(content)
    raise TypeError(f"a recipe is a mapping, a path, bytes or a file, not {type(recipe).__name__}")


def _sniff_weights_name(head: bytes) -> str:
    # torch.save writes a zip archive; anything else is offered to the API as safetensors.
    return "weights.pt" if head.startswith(b"PK\x03\x04") else "weights.safetensors"


def _file_part(
    value: FileInput, stack: contextlib.ExitStack, default_name: str | None
) -> tuple[str, Any]:
    """(file name, content or open file) for one multipart file."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        try:
            return path.name, stack.enter_context(path.open("rb"))
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {path}") from None
        except IsADirectoryError:
            raise FileNotFoundError(f"not a file: {path}") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return default_name or _sniff_weights_name(data[:4]), data
    if hasattr(value, "read"):
        name = getattr(value, "name", None)
        if isinstance(name, str) and name and not name.startswith("<"):
            return Path(name).name, value
        if default_name is None and hasattr(value, "peek"):
            return _sniff_weights_name(value.peek(4)[:4]), value
        if default_name is None:
            data = value.read()
            return _sniff_weights_name(data[:4]), data
        return default_name, value
    raise TypeError(f"a file is a path, bytes or a binary file, not {type(value).__name__}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- responses ------------------------------------------------------------------------------
def api_error(resp: httpx.Response) -> HawadaAPIError:
    """The :class:`HawadaAPIError` for an error response (read it first when streamed)."""
    code, message, details = "http_error", resp.text[:500] or resp.reason_phrase, None
    try:
        err = resp.json().get("error", {})
        code, message = err.get("code", code), err.get("message", message)
        details = err.get("details")
    except (ValueError, AttributeError):
        pass  # not our JSON error envelope (a proxy page, another service): keep the raw text
    return HawadaAPIError(resp.status_code, code, message, details)


def _decode(resp: httpx.Response) -> Any:
    if not resp.is_success:
        raise api_error(resp)
    if resp.status_code == 204 or not resp.content:
        return None
    return resp.json()


def _items(body: Any) -> builtins.list[dict[str, Any]]:
    items = body.get("items", body.get("events", [])) if isinstance(body, dict) else body
    return cast("builtins.list[dict[str, Any]]", items or [])


class _SSEParser:
    """Server-Sent Events, line by line: ``feed(line)`` returns an event at each blank line.

    Events come out in the shape of ``GET /v1/jobs/{id}/events`` items:
    ``{"seq", "kind", "created_at", "data"}``; the stream's ``end`` event is ``{"kind": "end"}``.
    """

    def __init__(self) -> None:
        self._event: str = "message"
        self._data: builtins.list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        if line == "":
            if not self._data and self._event == "message":
                return None
            out = self._build()
            self._event, self._data, self._id = "message", [], None
            return out
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            self._id = value
        return None

    def _build(self) -> dict[str, Any]:
        if self._event == "end":
            return {"kind": "end"}
        try:
            payload = json.loads("\n".join(self._data)) if self._data else {}
        except ValueError:
            payload = {"message": "\n".join(self._data)}
        seq = payload.pop("seq", None)
        if seq is None and self._id is not None and self._id.isdigit():
            seq = int(self._id)
        created = payload.pop("created_at", None)
        return {"seq": seq, "kind": self._event, "created_at": created, "data": payload}


class _NoEventStream(Exception):
    """The server answered the stream request with something else (an old API, a proxy)."""


def _is_event_stream(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").split(";")[0].strip() == "text/event-stream"


def _stream_timeout(base: httpx.Timeout, deadline: float | None) -> httpx.Timeout:
    read = SSE_READ_TIMEOUT_S
    if deadline is not None:
        read = max(0.1, min(read, deadline - time.monotonic()))
    return httpx.Timeout(base.connect, read=read, write=base.write, pool=base.pool)


def _stream_request(
    job_id: str, after: int, base: httpx.Timeout, deadline: float | None
) -> dict[str, Any]:
    """The keywords of one Server-Sent Events request for a job's events after ``after``."""
    return {
        "method": "GET",
        "url": f"/v1/jobs/{job_id}/events",
        "params": {"after": after},
        "headers": {"Accept": "text/event-stream"},
        "timeout": _stream_timeout(base, deadline),
    }


def _sse_parser(resp: httpx.Response) -> _SSEParser:
    """A parser for a successful stream answer; :class:`_NoEventStream` when it is not SSE."""
    if not _is_event_stream(resp):
        raise _NoEventStream()
    return _SSEParser()


class _Watch:
    """Bookkeeping of one watch: the last sequence number seen, the deadline, reconnections.

    A refused connection before any event arrived means the service is not there: give up at
    once. Later drops (an API restart, a proxy timeout) reconnect where the stream left off, up
    to ``SSE_RECONNECTS`` times in a row, then polling takes over.
    """

    def __init__(self, job_id: str, after: int, timeout: float | None) -> None:
        self.job_id, self.last, self.timeout = job_id, after, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.failures, self.seen = 0, False

    def streaming(self, sse: bool) -> bool:
        """Whether to (re)connect the event stream."""
        return sse and self.failures <= SSE_RECONNECTS

    def streamed(self, event: dict[str, Any]) -> bool:
        """Note an event from the stream; False at the stream's ``end`` (the job has ended)."""
        if event["kind"] == "end":
            return False
        self.failures, self.seen = 0, True
        self.last = max(self.last, int(event["seq"] or self.last))
        return True

    def polled(self, event: dict[str, Any]) -> None:
        """Note an event read by polling."""
        self.last = max(self.last, int(event.get("seq") or self.last))

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(f"job {self.job_id} still running after {self.timeout} s")

    def failed(self, exc: httpx.TransportError | None) -> bool:
        """Count a stream failure; True when ``exc`` should be raised as unreachable."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self._timed_out()
        self.failures += 1
        return isinstance(exc, httpx.ConnectError) and not self.seen

    def backoff(self) -> float:
        """Seconds to wait before reconnecting the stream."""
        return 0.0 if self.failures == 0 else min(2.0, 0.1 * 2**self.failures)

    def check_deadline(self) -> None:
        """Between polls: raise ``TimeoutError`` once the deadline has passed."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise self._timed_out()


class _Download:
    """One artifact download, apart from the transfer: where it goes, the sha256 it must
    match, the partial file it is written to and its running digest."""

    def __init__(self, job_id: str, name: str, dest: str | Path, sha256: str | None) -> None:
        path = Path(dest)
        self.dest = path / name if path.is_dir() else path
        self.job_id, self.name, self.sha256 = job_id, name, sha256
        self.url = f"/v1/jobs/{job_id}/artifacts/{name}"
        self.tmp = self.dest.with_name(self.dest.name + ".part")
        self._digest = hashlib.sha256()

    def expect_listed(self, job: dict[str, Any]) -> None:
        """Take the sha256 to match from the job's artifact listing."""
        listed = {a["name"]: a for a in job.get("artifacts", [])}
        if self.name not in listed:
            msg = f"job {self.job_id} has no artifact {self.name!r}"
            raise HawadaAPIError(404, "artifact_not_found", msg)
        self.sha256 = listed[self.name]["sha256"]

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[bytes], None]]:
        """A function that appends a block to the partial file and the digest."""
        with open(self.tmp, "wb") as fh:

            def write(block: bytes) -> None:
                self._digest.update(block)
                fh.write(block)

            yield write

    def discard(self) -> None:
        """Remove the partial file (the transfer failed)."""
        self.tmp.unlink(missing_ok=True)

    def finish(self) -> Path:
        """Check the digest, then move the partial file to ``dest``; ChecksumError otherwise."""
        if self._digest.hexdigest() != self.sha256:
            self.discard()
            raise ChecksumError(
                f"{self.name}: sha256 {self._digest.hexdigest()} != listed {self.sha256}"
            )
        self.tmp.replace(self.dest)
        return self.dest


@contextlib.contextmanager
def _submit_request(
    recipe: RecipeInput,
    weights: FileInput | None,
    dataset: FileInput | None,
    heldout: FileInput | None,
    model_id: str | None,
    idempotency_key: str | None,
) -> Iterator[dict[str, Any]]:
    """The request keywords of ``POST /v1/jobs``, its files open while the request is made."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    text = recipe_text(recipe)
    if model_id is not None:
        if weights is not None or dataset is not None or heldout is not None:
            raise ValueError(
                "a model_id submit is JSON only: pass no weights, dataset or heldout file"
            )
        yield {"headers": headers, "json": {"recipe": text, "model_id": model_id}}
        return
    if weights is None:
        raise ValueError("pass weights (a path, bytes or a file) or model_id")
    with contextlib.ExitStack() as stack:
        files = {"weights": _file_part(weights, stack, None)}
        if dataset is not None:
            files["dataset"] = _file_part(dataset, stack, "dataset.npz")
        if heldout is not None:
            files["heldout"] = _file_part(heldout, stack, "heldout.npz")
        yield {"headers": headers, "data": {"recipe": text}, "files": files}


@contextlib.contextmanager
def _upload_request(weights: FileInput, arch: str | None) -> Iterator[dict[str, Any]]:
    """The request keywords of ``POST /v1/models``, the weights open while the request is made."""
    data = {"arch": arch} if arch else None
    with contextlib.ExitStack() as stack:
        yield {"files": {"weights": _file_part(weights, stack, None)}, "data": data}


def _list_params(status: str | None, limit: int | None, cursor: str | None) -> dict[str, Any]:
    """The query of ``GET /v1/jobs``: the filters that were given."""
    return {
        k: v
        for k, v in {"status": status, "limit": limit, "cursor": cursor}.items()
        if v is not None
    }


def _check_progress(progress: ProgressCallback | None, wait: bool) -> None:
    if progress is not None and not wait:
        raise ValueError("progress= needs wait=True (it is called while waiting)")


class _ClientBase:
    """What both clients share that does no I/O: the address, the options of the httpx
    client, and how a transport failure reads."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def _http_options(
        self,
        api_key: str | None,
        timeout: float,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": timeout,
            "transport": transport,
        }

    def _unreachable(self, exc: httpx.TransportError) -> HawadaConnectionError:
        return HawadaConnectionError(self.base_url, str(exc) or type(exc).__name__)


# -- the blocking client --------------------------------------------------------------------
class HawadaClient(_ClientBase):
    """Blocking client for the ``/v1`` API; every method returns the decoded JSON.

    Example::

        from hawada import HawadaClient

        with HawadaClient("http://127.0.0.1:8000", api_key=None) as hc:
            job = hc.submit("recipe.yaml", "weights.safetensors")   # queued
            job = hc.wait(job["id"], progress=lambda e: print(e["kind"], e["data"]))
            print(job["status"], job["metrics"])

    ``base_url`` is the service's address; ``api_key`` the Bearer key when the service requires
    one; ``timeout`` the seconds for one request (not for a job: see :meth:`wait`).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url)
        self._http = httpx.Client(**self._http_options(api_key, timeout, transport))

    # -- plumbing -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> HawadaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        return _decode(resp)

    # -- service ------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok"}`` while the API process answers."""
        return self._request("GET", "/healthz")

    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200 (database and broker reachable); never raises."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def recipes(self) -> dict[str, Any]:
        """Built-in recipes: ``{"items": [{"name", "recipe"}]}``.

        Example: ``[r["name"] for r in hc.recipes()["items"]]``
        """
        return self._request("GET", "/v1/recipes")

    def architectures(self) -> dict[str, Any]:
        """Supported architectures: ``{"items": [{"name", "family"}]}``."""
        return self._request("GET", "/v1/architectures")

    # -- models -------------------------------------------------------------------------
    def upload_model(self, weights: FileInput, arch: str | None = None) -> dict[str, Any]:
        """Upload a weights file once; its ``id`` can be submitted as ``model_id`` many times.

        Example: ``model = hc.upload_model("resnet18.safetensors", arch="resnet18")``
        """
        with _upload_request(weights, arch) as kw:
            return self._request("POST", "/v1/models", **kw)

    def get_model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``."""
        return self._request("GET", f"/v1/models/{model_id}")

    # -- jobs ---------------------------------------------------------------------------
    def submit(
        self,
        recipe: RecipeInput,
        weights: FileInput | None = None,
        dataset: FileInput | None = None,
        *,
        heldout: FileInput | None = None,
        model_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Create a job from a recipe and a weights file (or an uploaded ``model_id``).

        ``recipe``: a mapping, a path, ``bytes`` or a file (see :data:`RecipeInput`);
        ``weights`` / ``dataset`` / ``heldout`` (a held-out .npz instead of a seeded split): a
        path, ``bytes`` or a binary file. Returns the queued job,
        or with ``wait=True`` the finished one (``progress(event)`` is called for each event
        meanwhile; ``timeout`` seconds bound the wait). Example::

            job = hc.submit({"model": {"arch": "resnet18", "num_classes": 10},
                             "data": {"source": "upload"}},
                            open("w.safetensors", "rb"), "train.npz", heldout="test.npz",
                            wait=True, progress=print)
        """
        _check_progress(progress, wait)
        with _submit_request(recipe, weights, dataset, heldout, model_id, idempotency_key) as kw:
            job: dict[str, Any] = self._request("POST", "/v1/jobs", **kw)
        if wait:
            return self.wait(job["id"], progress=progress, timeout=timeout)
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        """One job: status, phase, progress, error, metrics, artifacts."""
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the caller's jobs (newest first), optionally filtered by status:
        ``{"items": [...], "next_cursor": ...}``; pass ``next_cursor`` back for the next page."""
        return self._request("GET", "/v1/jobs", params=_list_params(status, limit, cursor))

    def events(self, job_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        """Events of a job with sequence number above ``after``, as they are now (no waiting):
        ``[{"seq", "kind", "created_at", "data"}]``."""
        return _items(self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after}))

    def _stream(self, job_id: str, after: int, deadline: float | None) -> Iterator[dict[str, Any]]:
        """One Server-Sent Events connection; yields events, then ``{"kind": "end"}``."""
        request = _stream_request(job_id, after, self._http.timeout, deadline)
        with self._http.stream(**request) as resp:
            if not resp.is_success:
                resp.read()
                raise api_error(resp)
            parser = _sse_parser(resp)
            for line in resp.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
                    if event["kind"] == "end":
                        return

    def watch(
        self,
        job_id: str,
        *,
        after: int = 0,
        poll_s: float = 1.0,
        timeout: float | None = None,
        sse: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Yield the job's events (after ``after``) as they happen, until the job has ended.

        Follows the Server-Sent Events stream (reconnecting after a dropped connection where
        it left off); falls back to polling every ``poll_s`` seconds when the server does not
        stream or ``sse=False``. Raises ``TimeoutError`` when ``timeout`` seconds pass first.
        Example::

            for event in hc.watch(job_id):
                if event["kind"] == "progress":
                    print(event["data"]["phase"], event["data"].get("step"))
        """
        state = _Watch(job_id, after, timeout)
        while state.streaming(sse):
            try:
                for event in self._stream(job_id, state.last, state.deadline):
                    if not state.streamed(event):
                        return
                    yield event
                state.failed(None)  # closed without `end` (a restarting API): reconnect
            except _NoEventStream:
                break
            except httpx.TransportError as exc:
                if state.failed(exc):
                    raise self._unreachable(exc) from None
            time.sleep(state.backoff())
        while True:
            ended = self.get(job_id)["status"] in TERMINAL_STATES
            for event in self.events(job_id, after=state.last):
                state.polled(event)
                yield event
            if ended:  # events read after the terminal state include the last ones
                return
            state.check_deadline()
            time.sleep(poll_s)

    def wait(
        self,
        job_id: str,
        *,
        progress: ProgressCallback | None = None,
        poll_s: float = 1.0,
        timeout: float | None = None,
        sse: bool = True,
    ) -> dict[str, Any]:
        """Block until the job has ended and return it (check ``job["status"]``).

        ``progress(event)`` is called for every event on the way (see :meth:`watch`).
        Example: ``job = hc.wait(job_id, timeout=3600)``
        """
        for event in self.watch(job_id, poll_s=poll_s, timeout=timeout, sse=sse):
            if progress is not None:
                progress(event)
        return self.get(job_id)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop; a queued job is cancelled at once, a running one winds down."""
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def delete(self, job_id: str) -> None:
        """Delete a finished job, its events and artifacts."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def download(self, job_id: str, name: str, dest: str | Path, sha256: str | None = None) -> Path:
        """Stream one artifact to ``dest`` (a file, or a folder to put ``name`` in).

        The checksum is verified against ``sha256`` or, when not given, the job's listing;
        on mismatch the partial file is removed and :class:`ChecksumError` raised.
        Example: ``hc.download(job_id, "pruned.json", "result/")``
        """
        dl = _Download(job_id, name, dest, sha256)
        if sha256 is None:
            dl.expect_listed(self.get(job_id))
        try:
            with self._http.stream("GET", dl.url) as resp:
                if not resp.is_success:
                    resp.read()
                    raise api_error(resp)
                with dl.writer() as write:
                    for block in resp.iter_bytes(1 << 20):
                        write(block)
        except httpx.TransportError as exc:
            dl.discard()
            raise self._unreachable(exc) from None
        return dl.finish()

    def download_all(self, job_id: str, dest_dir: str | Path) -> builtins.list[Path]:
        """Download every artifact of a job into ``dest_dir`` (checksums verified).

        Example: ``paths = hc.download_all(job_id, "result/")``
        """
        folder = Path(dest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [
            self.download(job_id, a["name"], folder / a["name"], sha256=a["sha256"])
            for a in self.get(job_id).get("artifacts", [])
        ]


# -- the asyncio client ---------------------------------------------------------------------
class AsyncHawadaClient(_ClientBase):
    """The same methods as :class:`HawadaClient`, as coroutines (``httpx.AsyncClient``).

    For notebooks (top-level ``await`` works in Jupyter) and asyncio services. Example::

        from hawada.client import AsyncHawadaClient

        async with AsyncHawadaClient("http://127.0.0.1:8000") as hc:
            job = await hc.submit("recipe.yaml", "weights.safetensors")
            async for event in hc.watch(job["id"]):
                print(event["kind"], event["data"].get("phase"))
            job = await hc.get(job["id"])

    ``progress`` callbacks may be plain functions or coroutine functions.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url)
        self._http = httpx.AsyncClient(**self._http_options(api_key, timeout, transport))

    async def aclose(self) -> None:
        """Close the underlying connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHawadaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, url: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        return _decode(resp)

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return await self._request("GET", "/healthz")

    async def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200; never raises."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def recipes(self) -> dict[str, Any]:
        """Built-in recipes: ``{"items": [{"name", "recipe"}]}``."""
        return await self._request("GET", "/v1/recipes")

    async def architectures(self) -> dict[str, Any]:
        """Supported architectures: ``{"items": [{"name", "family"}]}``."""
        return await self._request("GET", "/v1/architectures")

    async def upload_model(self, weights: FileInput, arch: str | None = None) -> dict[str, Any]:
        """Upload a weights file once (see :meth:`HawadaClient.upload_model`)."""
        with _upload_request(weights, arch) as kw:
            return await self._request("POST", "/v1/models", **kw)

    async def get_model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``."""
        return await self._request("GET", f"/v1/models/{model_id}")

    async def submit(
        self,
        recipe: RecipeInput,
        weights: FileInput | None = None,
        dataset: FileInput | None = None,
        *,
        heldout: FileInput | None = None,
        model_id: str | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Create a job (see :meth:`HawadaClient.submit`); ``wait=True`` returns it finished.

        Example: ``job = await hc.submit("r.yaml", "w.safetensors", wait=True, progress=print)``
        """
        _check_progress(progress, wait)
        with _submit_request(recipe, weights, dataset, heldout, model_id, idempotency_key) as kw:
            job: dict[str, Any] = await self._request("POST", "/v1/jobs", **kw)
        if wait:
            return await self.wait(job["id"], progress=progress, timeout=timeout)
        return job

    async def get(self, job_id: str) -> dict[str, Any]:
        """One job: status, phase, progress, error, metrics, artifacts."""
        return await self._request("GET", f"/v1/jobs/{job_id}")

    async def list(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the caller's jobs (see :meth:`HawadaClient.list`)."""
        return await self._request("GET", "/v1/jobs", params=_list_params(status, limit, cursor))

    async def events(self, job_id: str, after: int = 0) -> builtins.list[dict[str, Any]]:
        """Events of a job with sequence number above ``after`` (no waiting)."""
        body = await self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        return _items(body)

    async def _stream(
        self, job_id: str, after: int, deadline: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        request = _stream_request(job_id, after, self._http.timeout, deadline)
        async with self._http.stream(**request) as resp:
            if not resp.is_success:
                await resp.aread()
                raise api_error(resp)
            parser = _sse_parser(resp)
            async for line in resp.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
                    if event["kind"] == "end":
                        return

    async def watch(
        self,
        job_id: str,
        *,
        after: int = 0,
        poll_s: float = 1.0,
        timeout: float | None = None,
        sse: bool = True,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the job's events as they happen until it ends (see :meth:`HawadaClient.watch`)."""
        state = _Watch(job_id, after, timeout)
        while state.streaming(sse):
            try:
                async for event in self._stream(job_id, state.last, state.deadline):
                    if not state.streamed(event):
                        return
                    yield event
                state.failed(None)  # closed without `end` (a restarting API): reconnect
            except _NoEventStream:
                break
            except httpx.TransportError as exc:
                if state.failed(exc):
                    raise self._unreachable(exc) from None
            await asyncio.sleep(state.backoff())
        while True:
            ended = (await self.get(job_id))["status"] in TERMINAL_STATES
            for event in await self.events(job_id, after=state.last):
                state.polled(event)
                yield event
            if ended:  # events read after the terminal state include the last ones
                return
            state.check_deadline()
            await asyncio.sleep(poll_s)

    async def wait(
        self,
        job_id: str,
        *,
        progress: ProgressCallback | None = None,
        poll_s: float = 1.0,
        timeout: float | None = None,
        sse: bool = True,
    ) -> dict[str, Any]:
        """Wait until the job has ended and return it; ``progress`` sees every event."""
        async for event in self.watch(job_id, poll_s=poll_s, timeout=timeout, sse=sse):
            if progress is not None:
                result = progress(event)
                if inspect.isawaitable(result):
                    await result
        return await self.get(job_id)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop."""
        return await self._request("POST", f"/v1/jobs/{job_id}/cancel")

    async def delete(self, job_id: str) -> None:
        """Delete a finished job, its events and artifacts."""
        await self._request("DELETE", f"/v1/jobs/{job_id}")

    async def download(
        self, job_id: str, name: str, dest: str | Path, sha256: str | None = None
    ) -> Path:
        """Stream one artifact to ``dest``, sha256 verified (see :meth:`HawadaClient.download`)."""
        dl = _Download(job_id, name, dest, sha256)
        if sha256 is None:
            dl.expect_listed(await self.get(job_id))
        try:
            async with self._http.stream("GET", dl.url) as resp:
                if not resp.is_success:
                    await resp.aread()
                    raise api_error(resp)
                with dl.writer() as write:
                    async for block in resp.aiter_bytes(1 << 20):
                        write(block)
        except httpx.TransportError as exc:
            dl.discard()
            raise self._unreachable(exc) from None
        return dl.finish()

    async def download_all(self, job_id: str, dest_dir: str | Path) -> builtins.list[Path]:
        """Download every artifact of a job into ``dest_dir`` (checksums verified)."""
        folder = Path(dest_dir)
        folder.mkdir(parents=True, exist_ok=True)
        job = await self.get(job_id)
        return [
            await self.download(job_id, a["name"], folder / a["name"], sha256=a["sha256"])
            for a in job.get("artifacts", [])
        ]


__all__ = [
    "AsyncHawadaClient",
    "ChecksumError",
    "FileInput",
    "HawadaAPIError",
    "HawadaClient",
    "HawadaClientError",
    "HawadaConnectionError",
    "ProgressCallback",
    "RecipeInput",
    "recipe_text",
    "sha256_file",
]
