"""/v1/jobs/{id}/artifacts/{name}: download one result file."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from hawada.api.deps import CurrentOwner, SessionDep, StoreDep, job_or_404
from hawada.api.errors import ApiError
from hawada.api.routes.jobs import ERRORS
from hawada.store import jobs as repo
from hawada.store.artifacts import ARTIFACT_NAMES

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])

_MEDIA = {".json": "application/json", ".html": "text/html; charset=utf-8"}


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
)
def download_artifact(
    job_id: str, name: str, session: SessionDep, owner: CurrentOwner, store: StoreDep
) -> FileResponse:
    """The file, streamed, with its sha256 as ETag and `X-Checksum-SHA256`."""
    job_or_404(session, owner, job_id)
    record = repo.get_artifact(session, job_id, name) if name in ARTIFACT_NAMES else None
    path = store.path(job_id, name) if record is not None else None
    if record is None or path is None or not path.is_file():
        raise ApiError(404, "artifact_not_found", f"job has no artifact {name!r}")
    suffix = name[name.rfind(".") :]
    return FileResponse(
        path,
        media_type=_MEDIA.get(suffix, "application/octet-stream"),
        filename=name,
        headers={"ETag": f'"{record.sha256}"', "X-Checksum-SHA256": record.sha256},
    )
