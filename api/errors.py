"""One error shape for every failure: `{"error": {"code", "message"[, "details"]}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hawada.core.errors import HawadaError

log = logging.getLogger("hawada.api")

# Codes for plain HTTP errors raised by the framework itself (unknown route, wrong method...).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


class ApiError(Exception):
    """An error answered to the client as-is (status, stable code, human message)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def invalid_field(path: str, message: str) -> ApiError:
    """A 422 `invalid_request` about one field of the request."""
    return ApiError(
        422, "invalid_request", f"{path}: {message}", [{"path": path, "message": message}]
    )


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON response for an error."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error" if exc.status_code < 500 else "internal")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [{"path": _loc(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
    message = "; ".join(f"{d['path']}: {d['message']}" for d in details) or "invalid request"
    return error_response(422, "invalid_request", message, details)


async def _hawada_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HawadaError)
    details = getattr(exc, "errors", None)  # RecipeError lists every offending path
    if exc.code == "invalid_recipe" and details:
        message = "; ".join(f"{d['path']}: {d['message']}" for d in details)
        return error_response(422, exc.code, message, details)
    return error_response(422 if exc.code == "invalid_recipe" else 400, exc.code, exc.message)


async def _client_gone(_: Request, exc: Exception) -> JSONResponse:
    # The client closed the connection mid-request: nobody reads this answer; not a server error.
    log.info("client disconnected before its request was read")
    return error_response(400, "client_disconnected", "the client closed the connection")


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A 5xx is a bug: log it with its traceback, tell the client nothing internal.
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception type through the one JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HawadaError, _hawada_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
