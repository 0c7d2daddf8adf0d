"""Admission control: bound the requests that may hold a database connection at once.

Sync routes run in Starlette's thread pool (40 threads) and their response is serialised in a
second hop through that pool. A request that has finished its route holds its connection while
it waits for that second thread; if meanwhile every thread is blocked waiting for a pooled
connection, nothing moves until the pool times out (seen at 200 concurrent pollers). Admitting
at most half the pool's connections at once (a request may briefly hold two: its own session
and the key lookup's) means a thread never waits on an empty pool, so the queue forms here, in
the event loop, where waiting costs no thread.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _is_event_stream(scope: Scope) -> bool:
    # SSE streams live for minutes and take a short session per poll: they need no slot.
    for name, value in scope.get("headers", ()):
        if name == b"accept" and b"text/event-stream" in value:
            return True
    return False


class DbAdmissionMiddleware:
    """Hold a slot from the request's arrival until its response starts."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.slots = anyio.Semaphore(max(1, limit))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_event_stream(scope):
            await self.app(scope, receive, send)
            return
        await self.slots.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.slots.release()

        async def send_and_release(message: Message) -> None:
            # Once the response starts, the route and its serialisation are done: a download
            # streaming its body must not keep a database slot.
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()
