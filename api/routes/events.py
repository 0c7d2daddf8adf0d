"""/v1/jobs/{id}/events: progress events as a JSON page or a Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from hawada.api.deps import CurrentOwner, SettingsDep, job_or_404
from hawada.api.errors import ApiError
from hawada.api.routes.jobs import ERRORS
from hawada.api.schemas import EventList, EventPublic
from hawada.settings import Settings
from hawada.store import jobs as repo
from hawada.store.db import session_scope

router = APIRouter(prefix="/v1/jobs", tags=["events"])
log = logging.getLogger(__name__)

POLL_S = 0.5
#: Event sequence numbers are 32-bit integers in the database; larger cursors can match nothing.
MAX_SEQ = 2**31 - 1
KEEPALIVE_S = 15.0


def _page(
    database_url: str, owner: str, job_id: str, after: int, limit: int
) -> tuple[list[EventPublic], bool]:
    """Events after `after` and whether the job has ended (404 if it is not the owner's)."""
    with session_scope(database_url) as session:
        job = job_or_404(session, owner, job_id)
        events = [EventPublic.build(e) for e in repo.list_events(session, job_id, after, limit)]
        return events, job.is_terminal


#: Worker threads the open event streams may use together for their polls. Without this bound
#: hundreds of streams polling every POLL_S would hold most of the thread pool (40 threads) and
#: starve `GET /v1/jobs/{id}`; with it they wait for each other instead.
STREAM_THREADS = 4


def _stream_threads(request: Request) -> anyio.CapacityLimiter:
    state = request.app.state
    if getattr(state, "stream_threads", None) is None:  # made inside the loop that uses it
        state.stream_threads = anyio.CapacityLimiter(STREAM_THREADS)
    limiter: anyio.CapacityLimiter = state.stream_threads
    return limiter


def _admit_stream(streams: dict[str, int], owner: str, settings: Settings) -> None:
    """429 when the owner, or the service, has as many open event streams as allowed."""
    if streams.get(owner, 0) >= settings.max_event_streams_per_owner:
        limit = f"{settings.max_event_streams_per_owner} open event streams per key"
    elif sum(streams.values()) >= settings.max_event_streams:
        limit = f"{settings.max_event_streams} open event streams on this server"
    else:
        return
    raise ApiError(
        429,
        "too_many_streams",
        f"{limit}; close one or poll GET /v1/jobs/{{id}}/events?after=N",
        headers={"Retry-After": "5"},
    )


def _sse(event: EventPublic) -> str:
    # seq and created_at last: they are ours and must not be shadowed by the worker's data.
    # created_at exactly as the JSON page writes it (pydantic: ...Z), so both forms compare equal.
    created_at = event.model_dump(mode="json", include={"created_at"})["created_at"]
    payload = json.dumps({**event.data, "seq": event.seq, "created_at": created_at})
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {payload}\n\n"


def _heads(database_url: str, job_ids: list[str]) -> dict[str, tuple[int, bool]]:
    with session_scope(database_url) as session:
        return repo.event_heads(session, job_ids)


class EventWatch:
    """One poll per process for every followed job: which has new events, which has ended.

    Each open stream follows its job here; every POLL_S one query (`repo.event_heads`) reads
    the last event seq and the status of all followed jobs and wakes the streams. A stream
    reads its events only when its job has one past its cursor or has ended, so N idle streams
    cost one query per POLL_S instead of N (and leave the threads and CPU to polling clients).
    """

    def __init__(self, database_url: str, limiter: anyio.CapacityLimiter) -> None:
        self.database_url, self.limiter = database_url, limiter
        self.heads: dict[str, tuple[int, bool] | None] = {}  # None: the job is gone
        self._followers: dict[str, int] = {}
        self._signals: dict[str, asyncio.Event] = {}  # set when that job's head changes
        self._task: asyncio.Task[None] | None = None

    def follow(self, job_id: str) -> None:
        self._followers[job_id] = self._followers.get(job_id, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def unfollow(self, job_id: str) -> None:
        self._followers[job_id] -= 1
        if not self._followers[job_id]:
            del self._followers[job_id]
            self.heads.pop(job_id, None)
            self._signals.pop(job_id, None)

    def _news(self, job_id: str, after: int) -> bool:
        if job_id not in self.heads:
            return False  # not polled yet
        head = self.heads[job_id]
        return head is None or head[0] > after or head[1]

    async def wait(self, job_id: str, after: int, timeout: float) -> bool:
        """True once the job has an event past `after`, has ended or is gone; False after
        `timeout` seconds without."""
        with anyio.move_on_after(timeout):
            while not self._news(job_id, after):
                await self._signals.setdefault(job_id, asyncio.Event()).wait()
            return True
        return False

    async def _poll(self) -> None:
        while self._followers:
            ids = list(self._followers)
            try:
                heads = await anyio.to_thread.run_sync(
                    _heads, self.database_url, ids, limiter=self.limiter
                )
            except Exception:  # the database is away: the streams wait for the next poll
                log.warning("event poll failed; retrying in %.1f s", POLL_S, exc_info=True)
            else:
                for job_id in ids:
                    head = heads.get(job_id)
                    if job_id not in self._followers or (
                        job_id in self.heads and self.heads[job_id] == head
                    ):
                        continue  # only the streams of a job whose head changed wake up
                    self.heads[job_id] = head
                    signal = self._signals.pop(job_id, None)
                    if signal is not None:
                        signal.set()
            await asyncio.sleep(POLL_S)


def _event_watch(request: Request, database_url: str) -> EventWatch:
    state = request.app.state
    if getattr(state, "event_watch", None) is None:  # made inside the loop that uses it
        state.event_watch = EventWatch(database_url, _stream_threads(request))
    watch: EventWatch = state.event_watch
    return watch


async def _follow(
    request: Request, database_url: str, owner: str, job_id: str, after: int
) -> AsyncIterator[str]:
    """Yield new events until the job has ended and every event was sent."""
    streams = request.app.state.event_streams
    streams[owner] = streams.get(owner, 0) + 1
    watch = _event_watch(request, database_url)
    watch.follow(job_id)
    try:
        async for chunk in _follow_events(request, watch, database_url, owner, job_id, after):
            yield chunk
    finally:
        watch.unfollow(job_id)
        streams[owner] -= 1
        if not streams[owner]:
            del streams[owner]


PAGE = 500


async def _follow_events(
    request: Request, watch: EventWatch, database_url: str, owner: str, job_id: str, after: int
) -> AsyncIterator[str]:
    yield "retry: 2000\n\n"
    while True:
        try:
            events, ended = await anyio.to_thread.run_sync(
                _page, database_url, owner, job_id, after, PAGE, limiter=_stream_threads(request)
            )
        except ApiError:  # the job was deleted while we were following it
            yield "event: end\ndata: {}\n\n"
            return
        for event in events:
            after = event.seq
            yield _sse(event)
        if len(events) == PAGE:
            continue  # drain a backlog before waiting
        if ended:
            yield "event: end\ndata: {}\n\n"
            return
        # Wait for the watch to see an event past `after` (or the end); a comment line every
        # KEEPALIVE_S keeps proxies from closing an idle stream.
        while not await watch.wait(job_id, after, KEEPALIVE_S):
            if await request.is_disconnected():
                return
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "JSON page or SSE"},
    },
)
async def job_events(
    job_id: str,
    request: Request,
    owner: CurrentOwner,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="only events with seq > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventList | StreamingResponse:
    """Events in order; with `Accept: text/event-stream`, a stream following the job to its end."""
    url = settings.database_url
    if "text/event-stream" in request.headers.get("accept", ""):
        if last_event_id and last_event_id.isdigit():
            # A reconnecting EventSource resumes here; a number past any seq means "nothing yet".
            seq = int(last_event_id) if len(last_event_id) <= 10 else MAX_SEQ
            after = max(after, min(seq, MAX_SEQ))
        # 404 before streaming; through the streams' own threads like every poll of a stream.
        await anyio.to_thread.run_sync(
            _page, url, owner, job_id, after, 1, limiter=_stream_threads(request)
        )
        _admit_stream(request.app.state.event_streams, owner, settings)
        return StreamingResponse(
            _follow(request, url, owner, job_id, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events, _ = await run_in_threadpool(_page, url, owner, job_id, after, limit)
    return EventList(items=events)
