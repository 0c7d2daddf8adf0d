"""/v1/jobs: submit, list, get, cancel, delete."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import CurrentOwner, SessionDep, SettingsDep, StoreDep
from api.errors import ApiError
from api.schemas import ErrorBody, JobCreateJson, JobList, JobPublic
from api.uploads import check_dataset, check_weights, save_capped, weights_format
from core.config import Settings
from core.recipe import MAX_RECIPE_BYTES, Recipe, parse_recipe, recipe_hash, recipe_to_dict
from store import jobs as repo
from store.artifacts import ArtifactStore
from store.db import session_scope
from store.models import JOB_STATES, Job
from store.uploaded_models import get_model

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_JSON_BODY = 1024 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422)
}

SUBMIT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["recipe", "weights"],
                    "properties": {
                        "recipe": {"type": "string", "description": "recipe as JSON or YAML text"},
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": ".safetensors, or .pt/.pth state dict",
                        },
                        "dataset": {
                            "type": "string",
                            "format": "binary",
                            "description": "optional .npz with arrays x, y",
                        },
                    },
                }
            },
            "application/json": {"schema": JobCreateJson.model_json_schema()},
        },
    }
}


def job_or_404(session: Session, owner: str, job_id: str) -> Job:
    """The owner's job or a 404 (also for malformed ids and other owners' jobs)."""
    job = repo.get_job(session, owner, job_id) if _ID.match(job_id) else None
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r}")
    return job


def public(session: Session, job: Job) -> JobPublic:
    """A job as the API shows it, with its artifacts."""
    return JobPublic.build(job, repo.list_artifacts(session, [job.id])[job.id])


@dataclass
class _Inputs:
    """What a submission carries once its files are on disk."""

    recipe: Recipe
    weights_path: Path
    weights_sha256: str
    model_id: str | None = None
    dataset_path: Path | None = None
    uploaded: tuple[Path, ...] = ()  # files this request created (removed if it fails)


def _store_file(
    store: ArtifactStore, settings: Settings, upload: UploadFile, kind: str
) -> tuple[Path, str]:
    """Copy a multipart file into the store (capped) and check it; nothing kept on failure."""
    if kind == "weights":
        fmt = weights_format(upload.filename)
        suffix = Path(upload.filename or "").suffix.lower()
    else:
        suffix = ".npz"
    path, _size, sha = save_capped(store, kind, upload.file, settings.max_upload_bytes, suffix)
    try:
        if kind == "weights":
            check_weights(path, fmt)
        else:
            check_dataset(path, upload.filename)
    except BaseException:
        store.delete_upload(path)
        raise
    return path, sha


def _multipart_inputs(form: Any, store: ArtifactStore, settings: Settings) -> _Inputs:
    recipe_field = form.get("recipe")
    if recipe_field is None:
        raise ApiError(
            422,
            "invalid_request",
            "recipe: field required",
            [{"path": "recipe", "message": "field required"}],
        )
    if isinstance(recipe_field, UploadFile):
        recipe_field = recipe_field.file.read(MAX_RECIPE_BYTES + 1)  # parse_recipe refuses more
    recipe = parse_recipe(recipe_field)
    weights = form.get("weights")
    if not isinstance(weights, UploadFile):
        raise ApiError(
            422,
            "invalid_request",
            "weights: file required",
            [{"path": "weights", "message": "file required"}],
        )
    dataset = form.get("dataset")
    if dataset is not None and not isinstance(dataset, UploadFile):
        raise ApiError(
            422,
            "invalid_request",
            "dataset: must be a file",
            [{"path": "dataset", "message": "must be a file"}],
        )
    weights_path, weights_sha = _store_file(store, settings, weights, "weights")
    dataset_path = None
    if dataset is not None:
        try:
            dataset_path, _ = _store_file(store, settings, dataset, "dataset")
        except BaseException:
            store.delete_upload(weights_path)
            raise
    uploaded = (weights_path,) + ((dataset_path,) if dataset_path else ())
    return _Inputs(recipe, weights_path, weights_sha, None, dataset_path, uploaded)


def _json_inputs(body: Any, owner: str, settings: Settings) -> _Inputs:
    try:
        req = JobCreateJson.model_validate(body)
    except ValidationError as exc:
        details = [
            {"path": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()
        ]
        raise ApiError(
            422,
            "invalid_request",
            "; ".join(f"{d['path']}: {d['message']}" for d in details),
            details,
        ) from None
    recipe = parse_recipe(req.recipe)
    with session_scope(settings.database_url) as session:
        model = get_model(session, owner, req.model_id) if _ID.match(req.model_id) else None
    if model is None:
        raise ApiError(
            404, "model_not_found", f"no model {req.model_id!r}; upload it with POST /v1/models"
        )
    return _Inputs(recipe, Path(model.path), model.sha256, model.id)


def _create(
    inputs: _Inputs, owner: str, key: str | None, settings: Settings, store: ArtifactStore
) -> tuple[JobPublic, bool]:
    """Insert the job (or find the idempotent original); returns (job, created)."""
    if inputs.recipe.data.source == "upload" and inputs.dataset_path is None:
        raise ApiError(
            422,
            "invalid_request",
            "data.source is 'upload' but no dataset file was sent",
            [{"path": "dataset", "message": "file required for data.source upload"}],
        )
    rhash = recipe_hash(inputs.recipe)
    with session_scope(settings.database_url) as session:
        for _ in range(2):  # a second round only after losing an insert race on the same key
            if key is not None:
                original = repo.find_by_idempotency_key(session, owner, key)
                if original is not None:
                    if (
                        original.recipe_hash != rhash
                        or original.weights_sha256 != inputs.weights_sha256
                    ):
                        raise ApiError(
                            409,
                            "idempotency_conflict",
                            "Idempotency-Key was already used with a different request",
                        )
                    return public(session, original), False
            try:
                job = repo.create_job(
                    session,
                    owner=owner,
                    recipe=recipe_to_dict(inputs.recipe),
                    recipe_hash=rhash,
                    weights_path=str(inputs.weights_path),
                    weights_sha256=inputs.weights_sha256,
                    model_id=inputs.model_id,
                    dataset_path=str(inputs.dataset_path) if inputs.dataset_path else None,
                    idempotency_key=key,
                    max_attempts=settings.max_attempts,
                )
                return public(session, job), True
            except IntegrityError:
                session.rollback()
                if key is None:
                    raise
        raise ApiError(
            409, "idempotency_conflict", "concurrent requests with the same Idempotency-Key"
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
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length_header = request.headers.get("content-length") or "0"
    length = int(length_header) if length_header.isdigit() else 0
    # Two capped files plus form fields: refuse before reading anything when clearly too big.
    if length > 2 * settings.max_upload_bytes + MAX_JSON_BODY:
        raise ApiError(
            413, "upload_too_large", f"request exceeds {settings.max_upload_bytes} bytes per file"
        )
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=2, max_fields=8)
        try:
            inputs = await run_in_threadpool(_multipart_inputs, form, store, settings)
        finally:
            await form.close()
    elif ctype == "application/json":
        body = await request.body()
        if len(body) > MAX_JSON_BODY:
            raise ApiError(413, "upload_too_large", "JSON body too large")
        try:
            parsed = json.loads(body)
        except ValueError:
            raise ApiError(400, "bad_request", "body is not valid JSON") from None
        inputs = await run_in_threadpool(_json_inputs, parsed, owner, settings)
    else:
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data or application/json"
        )
    try:
        job, created = await run_in_threadpool(
            _create, inputs, owner, idempotency_key, settings, store
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
                session, job.id, "failed", error={"code": "broker_unavailable", "message": str(exc)}
            )
        raise ApiError(
            503, "broker_unavailable", "the job queue is unreachable; try again"
        ) from exc
    return job


@router.get("", response_model=JobList, responses=ERRORS)
def list_jobs(
    session: SessionDep,
    owner: CurrentOwner,
    status: Annotated[str | None, Query(description="filter by state")] = None,
    limit: Annotated[int, Query(ge=1, le=repo.MAX_PAGE)] = 50,
    cursor: str | None = None,
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
    return JobList(items=[JobPublic.build(j, arts[j.id]) for j in page], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> JobPublic:
    """One job: state, phase, progress, error, metrics and artifacts."""
    return public(session, job_or_404(session, owner, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, responses=ERRORS)
def cancel_job(job_id: str, session: SessionDep, owner: CurrentOwner) -> JobPublic:
    """Cancel: a queued job ends at once, a running one winds down (`cancelling`)."""
    before = job_or_404(session, owner, job_id)
    if before.is_terminal:
        raise ApiError(409, "job_finished", f"job is already {before.status}")
    job = repo.request_cancel(session, owner, job_id)
    assert job is not None  # it existed a moment ago and only its owner can delete it
    return public(session, job)


@router.delete("/{job_id}", status_code=204, responses=ERRORS)
def delete_job(job_id: str, session: SessionDep, owner: CurrentOwner, store: StoreDep) -> Response:
    """Delete a job that is not running, with its events, artifacts and uploaded inputs."""
    job = job_or_404(session, owner, job_id)
    # Uploaded inputs belong to the job, except weights registered as a reusable model.
    uploads = [job.dataset_path] + ([job.weights_path] if job.model_id is None else [])
    try:
        repo.delete_job(session, owner, job_id)
    except repo.JobBusy:
        raise ApiError(409, "job_running", "job is running; cancel it first") from None
    store.delete_job(job_id)
    for path in uploads:
        if path:
            store.delete_upload(path)
    return Response(status_code=204)
