"""Request body caps enforced while the bytes arrive, before anything is parsed or spooled.

`BodyLimitMiddleware` is pure ASGI: it answers 413 at once when a declared `Content-Length`
exceeds the route's cap, and otherwise counts the bytes of every `http.request` message as the
server hands them over (chunked bodies included) and raises `BodyTooLarge` (a 413 `ApiError`)
the moment the count passes the cap. The exception surfaces inside whatever is reading the body
(`request.form()`, `request.body()`), so no more than the cap plus one received chunk is ever
read, and Starlette closes the multipart files it had spooled.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hawada.api.errors import ApiError, error_response

MiB = 1024 * 1024
#: JSON bodies (a recipe with a model id) and multipart text fields.
MAX_JSON_BODY = 1024 * 1024
#: Room for multipart boundaries, part headers and text fields on top of the file caps.
FORM_MARGIN = 1024 * 1024
#: Routes that read no body still get a small allowance (a client may send an empty JSON object).
DEFAULT_BODY = 64 * 1024
#: File parts POST /v1/jobs accepts (weights, dataset, held-out set, recipe as a file).
JOB_FILE_PARTS = 4


class BodyTooLarge(ApiError):
    """The request body passed its cap; raised from `receive` while it streams in."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, "upload_too_large", f"request body exceeds {cap} bytes")
        self.cap = cap


def body_cap(method: str, path: str, content_type: str, max_upload_bytes: int) -> int:
    """The most bytes a request to `method path` with `content_type` may send."""
    if method != "POST":
        return DEFAULT_BODY
    multipart = content_type.startswith("multipart/form-data")
    if path == "/v1/jobs":
        return JOB_FILE_PARTS * max_upload_bytes + FORM_MARGIN if multipart else MAX_JSON_BODY
    if path == "/v1/models":
        return max_upload_bytes + FORM_MARGIN if multipart else MAX_JSON_BODY
    return DEFAULT_BODY


class BodyLimitMiddleware:
    """Cap every HTTP request body by route (see `body_cap`), counting bytes as they arrive."""

    def __init__(self, app: ASGIApp, cap_for: Callable[[str, str, str], int]) -> None:
        self.app = app
        self.cap_for = cap_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        cap = self.cap_for(scope["method"], scope["path"], ctype)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            # Refused before a byte of the body is read; the server closes the connection.
            response = error_response(413, "upload_too_large", f"request body exceeds {cap} bytes")
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(cap)
            return message

        await self.app(scope, limited_receive, send)


def route_caps(max_upload_bytes: int) -> Callable[[str, str, str], int]:
    """`body_cap` bound to the service's per-file upload cap."""

    def cap_for(method: str, path: str, content_type: str) -> int:
        return body_cap(method, path, content_type, max_upload_bytes)

    return cap_for
