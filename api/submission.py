"""Turning a job submission into a queued job: parse, store and check inputs, insert.

Runs in a worker thread (blocking file and database I/O); the route in `api/routes/jobs.py`
only reads the request and picks multipart or JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import UploadFile

from hawada.api.deps import OBJECT_ID, public_job
from hawada.api.errors import ApiError, invalid_field
from hawada.api.schemas import JobCreateJson, JobPublic
from hawada.api.uploads import (
    check_dataset,
    check_recipe_weights,
    check_weights,
    save_capped,
    weights_format,
)
from hawada.core.paths import resolve_within
from hawada.core.recipe import (
    MAX_RECIPE_BYTES,
    Recipe,
    parse_recipe,
    recipe_hash,
    recipe_to_dict,
)
from hawada.settings import Settings
from hawada.store import jobs as repo
from hawada.store.artifacts import ArtifactStore
from hawada.store.db import session_scope
from hawada.store.uploaded_models import get_model


@dataclass
class Submission:
    """What a submission carries once its files are on disk."""

    recipe: Recipe
    weights_path: Path
    weights_sha256: str
    model_id: str | None = None
    dataset_path: Path | None = None
    uploaded: tuple[Path, ...] = ()  # files this request created (removed if it fails)


def store_file(
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
            check_dataset(path, upload.filename, settings.max_dataset_bytes)
    except BaseException:
        store.delete_upload(path)
        raise
    return path, sha


def check_data_path(recipe: Recipe, settings: Settings) -> None:
    """Refuse a `data.path` outside HAWADA_DATA_ROOTS before anything is stored or queued.

    The worker enforces the same roots when it loads the data; refusing here gives the user a
    422 naming the field instead of a failed job.
    """
    path = recipe.data.path
    if path is None:
        return
    if "\x00" in path:  # no file system accepts it; resolving it would raise
        message = "must not contain a NUL character"
        raise ApiError(
            422,
            "invalid_recipe",
            f"data.path: {message}",
            [{"path": "data.path", "message": message}],
        )
    if resolve_within(path, settings.data_roots) is None:
        allowed = ", ".join(str(r) for r in settings.data_roots) or "none configured"
        message = f"{path!r} is outside the data folders this service may read ({allowed})"
        raise ApiError(
            422,
            "invalid_recipe",
            f"data.path: {message}",
            [{"path": "data.path", "message": message}],
        )


def from_multipart(form: Any, store: ArtifactStore, settings: Settings) -> Submission:
    """Parse the recipe field, then store and check the weights (and dataset) files."""
    recipe_field = form.get("recipe")
    if recipe_field is None:
        raise invalid_field("recipe", "field required")
    if isinstance(recipe_field, UploadFile):
        recipe_field = recipe_field.file.read(MAX_RECIPE_BYTES + 1)  # parse_recipe refuses more
    recipe = parse_recipe(recipe_field)
    check_data_path(recipe, settings)
    weights = form.get("weights")
    if not isinstance(weights, UploadFile):
        raise invalid_field("weights", "file required")
    dataset = form.get("dataset")
    if dataset is not None and not isinstance(dataset, UploadFile):
        raise invalid_field("dataset", "must be a file")
    weights_path, weights_sha = store_file(store, settings, weights, "weights")
    try:
        check_recipe_weights(recipe, weights_path)
    except BaseException:
        store.delete_upload(weights_path)
        raise
    dataset_path = None
    if dataset is not None:
        try:
            dataset_path, _ = store_file(store, settings, dataset, "dataset")
        except BaseException:
            store.delete_upload(weights_path)
            raise
    uploaded = (weights_path,) + ((dataset_path,) if dataset_path else ())
    return Submission(recipe, weights_path, weights_sha, None, dataset_path, uploaded)


def from_json(body: Any, owner: str, settings: Settings) -> Submission:
    """A JSON submission: the recipe plus the id of weights uploaded with POST /v1/models."""
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
    check_data_path(recipe, settings)
    with session_scope(settings.database_url) as session:
        model = get_model(session, owner, req.model_id) if OBJECT_ID.match(req.model_id) else None
    if model is None:
        raise ApiError(
            404, "model_not_found", f"no model {req.model_id!r}; upload it with POST /v1/models"
        )
    check_recipe_weights(recipe, Path(model.path))
    return Submission(recipe, Path(model.path), model.sha256, model.id)


def create_or_replay(
    inputs: Submission, owner: str, key: str | None, settings: Settings
) -> tuple[JobPublic, bool]:
    """Insert the job (or find the idempotent original); returns (job, created)."""
    if inputs.recipe.data.source == "upload" and inputs.dataset_path is None:
        raise invalid_field("dataset", "file required when data.source is 'upload'")
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
                    return public_job(session, original), False
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
                return public_job(session, job), True
            except IntegrityError:
                session.rollback()
                if key is None:
                    raise
        raise ApiError(
            409, "idempotency_conflict", "concurrent requests with the same Idempotency-Key"
        )
