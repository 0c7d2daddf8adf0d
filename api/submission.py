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
    heldout_path: Path | None = None


def store_file(
    store: ArtifactStore, settings: Settings, upload: UploadFile, kind: str
) -> tuple[Path, str]:
    """Copy a multipart file into the store (capped) and check it; nothing kept on failure."""
    if kind == "weights":
        fmt = weights_format(upload.filename)
        suffix = Path(upload.filename or "").suffix.lower()
    else:  # dataset | heldout
        suffix = ".npz"
    path, _size, sha = save_capped(store, kind, upload.file, settings.max_upload_bytes, suffix)
    try:
        if kind == "weights":
            check_weights(path, fmt)
        else:
            check_dataset(path, upload.filename, settings.max_dataset_bytes, kind)
    except BaseException:
        store.delete_upload(path)
        raise
    return path, sha


def _outside_roots_message(field: str, path: str, settings: Settings) -> str:
    if not settings.data_roots:
        return (
            f"{field} {path!r}: this service reads no server paths (HAWADA_DATA_ROOTS is not "
            "set); upload the data with the job (`dataset`/`heldout` .npz parts) instead, or ask "
            "the operator to add its folder to HAWADA_DATA_ROOTS"
        )
    roots = ", ".join(str(r) for r in settings.data_roots)
    return (
        f"{field} {path!r} is outside the data folders this service may read "
        f"(HAWADA_DATA_ROOTS: {roots})"
    )


def check_recipe_limits(recipe: Recipe, settings: Settings) -> None:
    """Refuse a recipe whose latency measurement alone would run for hours (422, naming the
    fields): images pushed through the model, batch_size x (warmup + repeats), are capped by
    HAWADA_MAX_LATENCY_IMAGES."""
    spec = recipe.latency
    images = spec.batch_size * (spec.warmup + spec.repeats)
    if images > settings.max_latency_images:
        message = (
            f"batch_size x (warmup + repeats) = {images} images exceeds this service's limit of "
            f"{settings.max_latency_images}; lower latency.repeats or latency.batch_size"
        )
        raise ApiError(
            422,
            "invalid_recipe",
            f"latency.repeats: {message}",
            [{"path": "latency.repeats", "message": message}],
        )


def check_data_path(recipe: Recipe, settings: Settings) -> None:
    """Refuse a `data.path`/`data.heldout_path` outside HAWADA_DATA_ROOTS before anything is
    stored or queued.

    The worker enforces the same roots when it loads the data; refusing here gives the user a
    422 naming the field, the variable and the configured roots instead of a failed job.
    """
    errors = []
    for field in ("path", "heldout_path"):
        path = getattr(recipe.data, field)
        if path is not None and "\x00" in path:  # no file system accepts it; resolving raises
            message = f"data.{field} must not contain a NUL character"
            errors.append({"path": f"data.{field}", "message": message})
        elif path is not None and resolve_within(path, settings.data_roots) is None:
            errors.append(
                {
                    "path": f"data.{field}",
                    "message": _outside_roots_message(f"data.{field}", path, settings),
                }
            )
    if errors:
        raise ApiError(422, "invalid_recipe", "; ".join(e["message"] for e in errors), errors)


def _file_part(form: Any, name: str) -> UploadFile | None:
    part = form.get(name)
    if part is not None and not isinstance(part, UploadFile):
        raise invalid_field(name, "must be a file")
    return part


def from_multipart(form: Any, store: ArtifactStore, settings: Settings) -> Submission:
    """Parse the recipe (a text field or a file part), then store and check the weights and
    the optional `dataset` and `heldout` files."""
    recipe_field = form.get("recipe")
    if recipe_field is None:
        raise invalid_field("recipe", "field required")
    if isinstance(recipe_field, UploadFile):
        recipe_field = recipe_field.file.read(MAX_RECIPE_BYTES + 1)  # parse_recipe refuses more
    recipe = parse_recipe(recipe_field)
    check_data_path(recipe, settings)
    check_recipe_limits(recipe, settings)
    weights = form.get("weights")
    if not isinstance(weights, UploadFile):
        raise invalid_field("weights", "file required")
    dataset = _file_part(form, "dataset")
    heldout = _file_part(form, "heldout")
    if heldout is not None and recipe.data.heldout_path is not None:
        raise invalid_field("heldout", "give data.heldout_path or a heldout file, not both")
    stored: list[Path] = []
    try:
        weights_path, weights_sha = store_file(store, settings, weights, "weights")
        stored.append(weights_path)
        check_recipe_weights(recipe, weights_path)
        dataset_path = heldout_path = None
        if dataset is not None:
            dataset_path, _ = store_file(store, settings, dataset, "dataset")
            stored.append(dataset_path)
        if heldout is not None:
            heldout_path, _ = store_file(store, settings, heldout, "heldout")
            stored.append(heldout_path)
    except BaseException:
        for path in stored:
            store.delete_upload(path)
        raise
    return Submission(
        recipe,
        weights_path,
        weights_sha,
        None,
        dataset_path,
        tuple(stored),
        heldout_path=heldout_path,
    )


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
    check_recipe_limits(recipe, settings)
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
    data = inputs.recipe.data
    if data.source == "upload" and inputs.dataset_path is None:
        raise invalid_field("dataset", "file required when data.source is 'upload'")
    if inputs.heldout_path is not None and data.source in ("folder", "webdataset"):
        # The held-out set must have the training set's form; a folder's is data.heldout_path.
        raise invalid_field(
            "heldout",
            f"an uploaded .npz held-out set needs an array source; for data.source "
            f"{data.source!r} set data.heldout_path to a {data.source} on the worker",
        )
    uses_upload = data.source == "upload" or (data.source == "npz" and data.path is None)
    if inputs.dataset_path is not None and not uses_upload:
        # An ignored upload would train on something other than what the user sent.
        raise invalid_field(
            "dataset",
            f"a dataset file was sent but data.source is {data.source!r}"
            + (" with data.path" if data.path else "")
            + "; use data.source 'upload' to train on it",
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
                    return public_job(session, original), False
            if repo.count_active(session, owner) >= settings.max_active_jobs_per_owner:
                raise ApiError(
                    429,
                    "too_many_active_jobs",
                    f"you have {settings.max_active_jobs_per_owner} jobs queued or running; "
                    "wait for one to finish or cancel one",
                    headers={"Retry-After": "30"},
                )
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
                    heldout_path=str(inputs.heldout_path) if inputs.heldout_path else None,
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
