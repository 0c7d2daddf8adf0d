"""/v1/models: upload weights once, reuse them in many jobs by id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from hawada.api.deps import OBJECT_ID, CurrentOwner, SessionDep, SettingsDep, StoreDep
from hawada.api.errors import ApiError, invalid_field
from hawada.api.routes.jobs import ERRORS, multipart_body
from hawada.api.schemas import ModelPublic
from hawada.api.uploads import check_weights, read_form, save_capped, weights_format
from hawada.core.architectures import supported_architectures
from hawada.settings import Settings
from hawada.store.artifacts import ArtifactStore
from hawada.store.db import session_scope
from hawada.store.jobs import new_id
from hawada.store.uploaded_models import create_model, get_model

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_OPENAPI = multipart_body(
    ["weights"],
    {
        "weights": {"type": "string", "format": "binary"},
        "arch": {"type": "string", "description": "optional architecture name"},
    },
)


def _register(
    form: dict[str, Any], owner: str, settings: Settings, store: ArtifactStore
) -> ModelPublic:
    """Store, check and register an uploaded weights file (nothing kept on failure)."""
    weights = form.get("weights")
    if not isinstance(weights, UploadFile):
        raise invalid_field("weights", "file required")
    arch = form.get("arch") or None
    if arch is not None and (not isinstance(arch, str) or arch not in supported_architectures()):
        raise ApiError(
            422, "unsupported_arch", f"unknown architecture {arch!r}; see GET /v1/architectures"
        )
    fmt = weights_format(weights.filename)
    suffix = Path(weights.filename or "").suffix.lower()
    path, size, sha = save_capped(store, "models", weights.file, settings.max_upload_bytes, suffix)
    try:
        check_weights(path, fmt)
        with session_scope(settings.database_url) as session:
            model = create_model(
                session,
                model_id=new_id(),
                owner=owner,
                filename=Path(weights.filename or "weights").name[:255],
                format=fmt,
                size=size,
                sha256=sha,
                path=str(path),
                arch=arch,
            )
    except BaseException:
        store.delete_upload(path)
        raise
    return ModelPublic.build(model)


@router.post(
    "", status_code=201, response_model=ModelPublic, openapi_extra=UPLOAD_OPENAPI, responses=ERRORS
)
async def upload_model(
    request: Request, owner: CurrentOwner, settings: SettingsDep, store: StoreDep
) -> ModelPublic:
    """Store a weights file; jobs then refer to it with `{"model_id": ...}`."""
    if (
        request.headers.get("content-type", "").split(";")[0].strip().lower()
        != "multipart/form-data"
    ):
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data with a weights file"
        )
    form = await read_form(
        request, max_files=1, max_fields=4, max_file_bytes=settings.max_upload_bytes
    )
    try:
        return await run_in_threadpool(_register, dict(form), owner, settings, store)
    finally:
        await form.close()


@router.get("/{model_id}", response_model=ModelPublic, responses=ERRORS)
def read_model(model_id: str, session: SessionDep, owner: CurrentOwner) -> ModelPublic:
    """An uploaded model's metadata."""
    model = get_model(session, owner, model_id) if OBJECT_ID.match(model_id) else None
    if model is None:
        raise ApiError(404, "model_not_found", f"no model {model_id!r}")
    return ModelPublic.build(model)
