"""Service settings: the one pydantic-settings class, read from `HAWADA_*` environment variables.

Used by the API, the store and the worker (and `hawada run` for its LUT folder); never by
`hawada.core` or `hawada.adapters`, which take what they need as parameters. No torch here: the
API process imports this module.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
#: Passwords production refuses: defaults from examples and images, and the empty one.
DEFAULT_SECRETS = frozenset(
    {"", "change-me", "changeme", "changethis", "password", "secret", "postgres", "hawada", "redis"}
)

# Fields whose embedded default lives under var_dir; filled in from var_dir unless set.
_VAR_DEFAULTS = {
    "database_url": lambda var: f"sqlite:///{var / 'hawada.db'}",
    "artifacts_dir": lambda var: var / "artifacts",
    "lut_dir": lambda var: var / "lut",
}


class Settings(BaseSettings):
    """Everything configurable about the service; defaults are the embedded (no services) mode."""

    model_config = SettingsConfigDict(env_prefix="HAWADA_", extra="ignore")

    environment: Literal["local", "production"] = "local"
    var_dir: Path = Path("./var")
    database_url: str = "sqlite:///var/hawada.db"
    broker_url: str = "filesystem://"
    artifacts_dir: Path = Path("./var/artifacts")
    auth_required: bool = False
    # Bearer token that shows /metrics' job counts and phase durations when auth is required
    # (without it /metrics shows only this process's HTTP metrics: nothing about any tenant).
    operator_key: str | None = None
    max_upload_bytes: int = 512 * MiB
    # Decompressed size an uploaded .npz dataset may declare (its arrays' shape x itemsize).
    max_dataset_bytes: int = 2048 * MiB
    job_time_limit_s: float = 6 * 3600.0
    lease_s: float = 60.0
    max_attempts: int = 3
    # Workers beat every heartbeat_s; /readyz needs one that beat within 3 x heartbeat_s.
    heartbeat_s: float = 5.0
    # Per-owner and total bounds: queued + running jobs, and open event streams (429 beyond).
    max_active_jobs_per_owner: int = 20
    # How long an API process may answer `GET /v1/jobs/{id}` from its own copy of the job (the
    # polling hot path; the process's own cancel/delete drop the copy at once). 0 disables.
    job_cache_s: float = Field(default=0.5, ge=0.0, le=10.0)
    # uvicorn's line per request (off: at polling rates it costs a third of the API's CPU;
    # /metrics counts requests and their latency per route either way).
    access_log: bool = False
    max_event_streams: int = 200
    max_event_streams_per_owner: int = 8
    # Images one latency measurement may push through a model: batch_size x (warmup + repeats).
    max_latency_images: int = 200_000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lut_dir: Path = Path("./var/lut")
    # Worker-local folder where teacher logits persist across jobs on the same weights file,
    # images and device (several methods or targets on one model skip the teacher's passes).
    # Unset: every job computes its own. Files are small (samples x classes floats) and are
    # never pruned by the service: point it at a folder you clear.
    teacher_cache_dir: Path | None = None
    # Folders a service job's `data.path` may name (JSON list in HAWADA_DATA_ROOTS). Empty: the
    # service refuses `data.path`, so a remote user cannot make a worker read arbitrary files.
    data_roots: list[Path] = []

    @field_validator("operator_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """`HAWADA_OPERATOR_KEY=` (compose's default) means no operator key."""
        return value or None

    @model_validator(mode="before")
    @classmethod
    def _derive_from_var_dir(cls, data: Any) -> Any:
        """Place the database, artifacts and LUT cache under var_dir unless given explicitly."""
        if not isinstance(data, dict):
            return data
        var = Path(data.get("var_dir") or "./var")
        for name, default in _VAR_DEFAULTS.items():
            if data.get(name) in (None, ""):
                data[name] = default(var)
        return data

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        """Production must authenticate, run on a server database and use real secrets."""
        if self.environment == "production":
            if not self.auth_required:
                raise ValueError("environment=production requires auth_required=true")
            if self.database_url.startswith("sqlite"):
                raise ValueError("environment=production requires a server database, not SQLite")
            # A known default password is refused; PostgreSQL may also authenticate without
            # one (certificates, peer), Redis cannot: it needs a password in production.
            db_password = urlsplit(self.database_url).password
            if db_password is not None and db_password.lower() in DEFAULT_SECRETS:
                raise ValueError("environment=production refuses a default database_url password")
            if self.broker_url.startswith(("redis://", "rediss://")):
                password = urlsplit(self.broker_url).password
                if not password or password.lower() in DEFAULT_SECRETS:
                    raise ValueError("environment=production refuses broker_url without a password")
            if self.operator_key is not None and (
                len(self.operator_key) < 16 or self.operator_key.lower() in DEFAULT_SECRETS
            ):
                raise ValueError("environment=production refuses a weak operator_key")
        if self.max_upload_bytes <= 0 or self.max_dataset_bytes <= 0:
            raise ValueError("max_upload_bytes and max_dataset_bytes must be positive")
        if self.lease_s <= 0 or self.max_attempts < 1:
            raise ValueError("lease_s must be > 0 and max_attempts >= 1")
        return self

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded `filesystem://` Celery transport (shared by API and worker)."""
        return self.var_dir / "broker" / "queue"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings so the next `get_settings()` re-reads the environment (tests)."""
    get_settings.cache_clear()
