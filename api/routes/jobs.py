"""/v1/jobs: submit, list, get, cancel, delete."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from hawada.api.deps import (
    CurrentOwner,
    SessionDep,
    SettingsDep,
    StoreDep,
    job_or_404,
    public_job,
)
from hawada.api.errors import ApiError
from hawada.api.limits import JOB_FILE_PARTS
from hawada.api.schemas import ErrorBody, JobCreateJson, JobList, JobPublic
from hawada.api.submission import create_or_replay, from_json, from_multipart
from hawada.api.uploads import parse_json_body, read_form
from hawada.lifecycle import JOB_STATES
from hawada.store import jobs as repo
from hawada.store.db import session_scope
from hawada.store.workdirs import remove_job_leftovers

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422)
}


def multipart_body(
    required: list[str],
    properties: dict[str, Any],
    other_content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose required body is a multipart/form-data object
    with `properties` (`required` of them mandatory); `other_content` adds other media types."""
    schema = {"type": "object", "required": required, "properties": properties}
    content = {"multipart/form-data": {"schema": schema}, **(other_content or {})}
    return {"requestBody": {"required": True, "content": content}}


SUBMIT_OPENAPI: dict[str, Any] = multipart_body(
    ["recipe", "weights"],
    {
        "recipe": {
            "type": "string",
            "description": "recipe as JSON or YAML, a text field or a file part",
        },
        "weights": {
            "type": "string",
            "format": "binary",
            "description": ".safetensors, or .pt/.pth state dict",
        },
        "dataset": {
            "type": "string",
            "format": "binary",
            "description": "optional .npz with arrays x, y (training data for "
            "data.source upload, or npz without data.path)",
        },
        "heldout": {
            "type": "string",
            "format": "binary",
            "description": "optional .npz with arrays x, y: the held-out set "
            "(instead of a seeded split of the training data)",
        },
    },
    {"application/json": {"schema": JobCreateJson.model_json_schema()}},
)


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    openapi_extra=SUBMIT_OPENAPI,
    responses={200: {"model": JobPublic, "description": "idempotent replay"}, **ERRORS},
)
async def submit_job(
    request: Request,
    response: Response,
    owner: CurrentOwner,
    settings: SettingsDep,
    store: StoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    """Submit a compression job (multipart upload, or JSON with a `model_id`)."""
    # The body as a whole is capped while it arrives (api/limits.py); each file part here.
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        # Parts: `recipe` (a text field or a file part), `weights`, optional `dataset`, `heldout`.
        form = await read_form(
            request,
            max_files=JOB_FILE_PARTS,
            max_fields=8,
            max_file_bytes=settings.max_upload_bytes,
        )
        try:
            inputs = await run_in_threadpool(from_multipart, form, store, settings)
        finally:
            await form.close()
    elif ctype == "application/json":
        parsed = parse_json_body(await request.body())
        inputs = await run_in_threadpool(from_json, parsed, owner, settings)
    else:
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data or application/json"
        )
    try:
        job, created = await run_in_threadpool(
            create_or_replay, inputs, owner, idempotency_key, settings
        )
    except BaseException:
        for path in inputs.uploaded:
            store.delete_upload(path)
        raise
    if not created:
        for path in inputs.uploaded:  # the replay's files duplicate the original's
            store.delete_upload(path)
        response.status_code = 200
        return job
    try:
        await run_in_threadpool(request.app.state.enqueue, job.id)
    except Exception as exc:
        with session_scope(settings.database_url) as session:
            repo.finish_job(
                session,
                job.id,
                "failed",
                error={"code": "broker_unavailable", "message": "the job queue was unreachable"},
            )
            # Only accepted jobs keep their key: a retry with the same key creates a new job.
            repo.forget_idempotency_key(session, job.id)
        raise ApiError(
            503, "broker_unavailable", "the job queue is unreachable; try again"
        ) from exc
    return job


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    session: SessionDep,
    owner: CurrentOwner,
    status: Annotated[
        str | None, Query(description="filter by state", json_schema_extra={"enum": JOB_STATES})
    ] = None,
    limit: Annotated[int, Query(ge=1, le=repo.MAX_PAGE)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="`next_cursor` of the previous page")
    ] = None,
) -> JobList:
    """The caller's jobs, newest first, one page at a time."""
    if status is not None and status not in JOB_STATES:
        raise ApiError(422, "invalid_request", f"status must be one of {', '.join(JOB_STATES)}")
    try:
        page, next_cursor = repo.list_jobs(
            session, owner, status=status, limit=limit, cursor=cursor
        )
    except repo.InvalidCursor as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from None
    arts = repo.list_artifacts(session, [j.id for j in page])
    items = [JobPublic.build(j, arts[j.id] if j.status == "succeeded" else []) for j in page]
    return JobList(items=items, next_cursor=next_cursor)


def _job_json(database_url: str, owner: str, job_id: str) -> bytes:
    with session_scope(database_url) as session:
        return public_job(session, job_or_404(session, owner, job_id)).model_dump_json().encode()


clock = time.monotonic  # the copies' clock (a test moves it)


class JobBodyCache:
    """job id -> (owner, JSON body, expiry): this process's recent answers to GET /v1/jobs/{id}.

    Clients poll that route many times a second while a job changes every few seconds at most;
    answering a poll from a copy at most `job_cache_s` old costs no thread hop and no query.
    Concurrent polls that miss share one database read (no burst of reads each time a copy
    expires). A copy is served only to its owner, so one tenant never sees another's job;
    bounded (cleared when full); this process's own cancel and delete drop the job's copy, and
    any read in flight, at once. Other processes' writes (the worker's progress, another API
    process's cancel) show within `job_cache_s`.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, bytes, float]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[bytes]] = {}

    async def fetch(
        self, owner: str, job_id: str, ttl: float, load: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """The copy if it is fresh, else the result of one `load()` shared by concurrent misses."""
        now = clock()
        hit = self._entries.get(job_id)
        if hit is not None and hit[0] == owner and hit[2] > now:
            return hit[1]
        key = (owner, job_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(load())
            self._pending[key] = pending
            pending.add_done_callback(partial(self._settle, key, now + ttl))
        return await asyncio.shield(pending)  # a waiter's disconnect does not cancel the read

    def _settle(self, key: tuple[str, str], expires: float, done: asyncio.Future[bytes]) -> None:
        if self._pending.get(key) is not done:
            return  # dropped while reading: what was read may predate the drop
        del self._pending[key]
        if not done.cancelled() and done.exception() is None:  # a 404 is not kept
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[key[1]] = (key[0], done.result(), expires)

    def drop(self, job_id: str) -> None:
        self._entries.pop(job_id, None)
        for key in [k for k in self._pending if k[1] == job_id]:
            del self._pending[key]


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
async def get_job(
    job_id: str, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> Response:
    """One job: state, phase, progress, error, metrics and artifacts (at most `job_cache_s` old)."""
    # The hottest route (clients poll it): a recent copy is answered in the event loop; otherwise
    # one thread hop for session, query and serialisation, and the JSON is the response (FastAPI
    # does not validate and re-encode a Response).

    async def load() -> bytes:
        return await run_in_threadpool(_job_json, settings.database_url, owner, job_id)

    if settings.job_cache_s > 0:
        cache: JobBodyCache = request.app.state.job_cache
        body = await cache.fetch(owner, job_id, settings.job_cache_s, load)
    else:
        body = await load()
    return Response(body, media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, responses=ERRORS)
def cancel_job(
    job_id: str, request: Request, session: SessionDep, owner: CurrentOwner
) -> JobPublic:
    """Cancel: a queued job ends at once, a running one winds down (`cancelling`)."""
    job_cache: JobBodyCache = request.app.state.job_cache
    job_cache.drop(job_id)
    before = job_or_404(session, owner, job_id)
    if before.is_terminal:
        raise ApiError(409, "job_finished", f"job is already {before.status}")
    job = repo.request_cancel(session, owner, job_id)
    assert job is not None  # it existed a moment ago and only its owner can delete it
    job_cache.drop(job_id)
    return public_job(session, job)


@router.delete("/{job_id}", status_code=204, responses=ERRORS)
def delete_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    owner: CurrentOwner,
    store: StoreDep,
    settings: SettingsDep,
) -> Response:
    """Delete a job that is not running, with its events, artifacts and uploaded inputs."""
    job = job_or_404(session, owner, job_id)
    # Uploaded inputs belong to the job, except weights registered as a reusable model.
    uploads = [job.dataset_path, job.heldout_path] + (
        [job.weights_path] if job.model_id is None else []
    )
    try:
        repo.delete_job(session, owner, job_id)
    except repo.JobBusy:
        raise ApiError(409, "job_running", "job is running; cancel it first") from None
    request.app.state.job_cache.drop(job_id)
    store.delete_job(job_id)
    remove_job_leftovers(settings.var_dir, job_id)
    for path in uploads:
        if path:
            store.delete_upload(path)
    return Response(status_code=204)
