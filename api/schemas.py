"""Request and response bodies of the HTTP API (what OpenAPI documents)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from hawada.store.models import Artifact, Job, JobEvent, Model


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable slug, e.g. invalid_recipe")
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobError(BaseModel):
    code: str
    message: str


class ArtifactPublic(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class JobPublic(BaseModel):
    id: str
    status: str = Field(
        description="queued | running | cancelling | succeeded | failed | cancelled"
    )
    phase: str | None
    progress: float = Field(ge=0, le=1)
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    error: JobError | None
    metrics: dict[str, Any] | None
    artifacts: list[ArtifactPublic]
    attempts: int
    model_id: str | None
    recipe: dict[str, Any]

    @classmethod
    def build(cls, job: Job, artifacts: list[Artifact]) -> JobPublic:
        """The public view of a job row and its artifact records."""
        error = None
        if job.error_code:
            error = JobError(code=job.error_code, message=job.error_message or "")
        return cls(
            id=job.id,
            status=job.status,
            phase=job.phase,
            progress=job.progress,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            error=error,
            metrics=job.metrics,
            artifacts=[
                ArtifactPublic(
                    name=a.name,
                    size=a.size,
                    sha256=a.sha256,
                    url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
                )
                for a in artifacts
            ],
            attempts=job.attempts,
            model_id=job.model_id,
            recipe=job.recipe,
        )


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null at the end"
    )


class JobCreateJson(BaseModel):
    """JSON submission that reuses weights uploaded earlier with POST /v1/models."""

    recipe: dict[str, Any] | str = Field(description="recipe as an object, or JSON/YAML text")
    model_id: str


class EventPublic(BaseModel):
    seq: int
    kind: str = Field(description="phase | progress | log | ...")
    created_at: datetime
    data: dict[str, Any]

    @classmethod
    def build(cls, event: JobEvent) -> EventPublic:
        return cls(seq=event.seq, kind=event.kind, created_at=event.created_at, data=event.data)


class EventList(BaseModel):
    items: list[EventPublic]


class ModelPublic(BaseModel):
    id: str
    filename: str
    format: str
    size: int
    sha256: str
    arch: str | None
    created_at: datetime

    @classmethod
    def build(cls, model: Model) -> ModelPublic:
        return cls(
            id=model.id,
            filename=model.filename,
            format=model.format,
            size=model.size,
            sha256=model.sha256,
            arch=model.arch,
            created_at=model.created_at,
        )


class RecipePublic(BaseModel):
    name: str
    recipe: dict[str, Any]


class RecipeList(BaseModel):
    items: list[RecipePublic]


class CouplingGroupPublic(BaseModel):
    """Channels kept or removed together: full width, unit (a conv group), member layers."""

    name: str
    channels: int
    unit_width: int
    residual: bool
    modules: list[str]


class ArchitecturePublic(BaseModel):
    name: str
    family: str
    groups: list[CouplingGroupPublic] = []


class UnsupportedArchitecturePublic(BaseModel):
    name: str
    family: str
    reason: str


class ArchitectureList(BaseModel):
    items: list[ArchitecturePublic]
    unsupported: list[UnsupportedArchitecturePublic] = []
