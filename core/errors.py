"""Errors the engine raises for user-caused problems. No torch here: the API imports this."""

from __future__ import annotations


class HawadaError(Exception):
    """A failure the user can fix; `code` is a stable machine-readable slug."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class JobError(HawadaError):
    code = "job_failed"


class JobCancelled(Exception):
    """Raised inside the engine when the job's cancel flag is seen."""


class WeightsError(HawadaError):
    code = "bad_weights"


class DataError(HawadaError):
    code = "bad_dataset"


class UnsupportedArch(HawadaError):
    code = "unsupported_arch"
