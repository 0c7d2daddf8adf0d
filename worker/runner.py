"""Run one job inside a worker process: claim it, keep its lease, feed its events to the
database, store its artifacts and record how it ended.

Torch is imported only inside :func:`execute` (through ``hawada.worker.pipeline``), so the Celery
parent process, which imports this module for the reaper, never loads it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from hawada.core.errors import HawadaError, JobCancelled
from hawada.lifecycle import PHASES, TERMINAL_STATES
from hawada.settings import Settings, get_settings
from hawada.store import heartbeats, jobs, uploaded_models, workdirs
from hawada.store.artifacts import ARTIFACT_NAMES, ArtifactStore
from hawada.store.db import session_scope

log = logging.getLogger("hawada.worker")

# Progress events are throttled to one per this many seconds (phase/log events never are).
PROGRESS_EVERY_S = 1.0
# Share of a typical job's time per phase (lifecycle order): the job's `progress` is overall
# and monotone, while each progress event keeps the engine's within-phase fraction.
PHASE_SHARE = {
    "loading": 0.03,
    "baseline": 0.05,
    "profiling": 0.07,
    "training": 0.60,
    "exporting": 0.03,
    "finetuning": 0.15,
    "evaluating": 0.05,
    "packaging": 0.02,
}
assert tuple(PHASE_SHARE) == PHASES, "PHASE_SHARE must list the lifecycle's phases in order"


def overall_progress(phase: str | None, fraction: float) -> float:
    """Job progress 0..1 from the current phase and the fraction of it done."""
    if phase not in PHASE_SHARE:
        return 0.0
    done = 0.0
    for name, share in PHASE_SHARE.items():
        if name == phase:
            return min(1.0, done + share * min(1.0, max(0.0, fraction)))
        done += share
    return done


def worker_id() -> str:
    """This process's identity in the ``jobs.worker_id`` column."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseKeeper(threading.Thread):
    """Renews the job's lease every ``lease_s / 3`` and mirrors its cancel flag.

    The engine checks ``cancel`` (a ``threading.Event``) every step, which costs nothing;
    the database is polled here, off the training loop. Losing the lease (another worker
    took the job over, or it was deleted) also sets ``cancel`` and ``lost``: this worker
    must stop writing results for a job it no longer owns.
    """

    def __init__(self, url: str, job_id: str, owner: str, lease_s: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.url, self.job_id, self.owner, self.lease_s = url, job_id, owner, lease_s
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._halt = threading.Event()

    def renew_once(self) -> None:
        """One renewal round (also used directly by tests)."""
        with session_scope(self.url) as session:
            if jobs.renew_lease(session, self.job_id, self.owner, self.lease_s):
                return
            job = jobs.load_job(session, self.job_id)
        # False means "stop": either a cancel was asked or the job is no longer ours.
        if (
            job is None
            or job.worker_id != self.owner
            or job.status not in ("running", "cancelling")
        ):
            self.lost.set()
        self.cancel.set()

    def run(self) -> None:
        interval = max(0.2, self.lease_s / 3.0)
        # Cancellation should be seen within about a second even with a long lease.
        poll = min(interval, 1.0)
        next_renew = time.monotonic() + interval
        while not self._halt.wait(poll):
            try:
                if time.monotonic() >= next_renew:
                    self.renew_once()
                    next_renew = time.monotonic() + interval
                else:
                    with session_scope(self.url) as session:
                        if jobs.is_cancel_requested(session, self.job_id):
                            self.cancel.set()
            except Exception:
                log.exception("lease renewal for %s failed; retrying", self.job_id)

    def stop(self) -> None:
        """Stop renewing (the job has ended) and wait for the thread."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)


class EventSink:
    """The pipeline's ``on_event``: phase and log events are stored at once, progress
    events at most every ``PROGRESS_EVERY_S`` (so the DB sees about one write a second).

    Phase and progress events are stored with ``job_progress``, the job's overall progress
    (the ``progress`` of ``GET /v1/jobs/{id}``), next to the engine's within-phase ``progress``.
    """

    def __init__(self, url: str, job_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.job_id, self._clock = url, job_id, clock
        self._last_progress = float("-inf")
        self.phase: str | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind", "log")
        now = self._clock()
        if kind == "progress":
            final = float(event.get("progress", 0.0)) >= 1.0
            if not final and now - self._last_progress < PROGRESS_EVERY_S:
                return
            self._last_progress = now
        if kind == "phase":
            self.phase = event.get("phase")
            self._last_progress = float("-inf")  # first progress of a phase is always shown
        data = _jsonable(event)
        phase, overall = self.phase, None
        if kind == "phase":
            overall = overall_progress(phase, 0.0)
        elif kind == "progress":
            phase = event.get("phase", self.phase)
            overall = overall_progress(phase, float(event.get("progress", 0.0)))
        if overall is not None:
            data["job_progress"] = round(overall, 4)
        with session_scope(self.url) as session:
            jobs.add_event(session, self.job_id, kind, data)
            if overall is not None:
                jobs.set_progress(session, self.job_id, phase=phase, progress=overall)


def _jsonable(value: Any) -> Any:
    """Events may carry numpy/torch scalars; store plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def metrics_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The job's ``metrics``: the headline numbers of a report."""
    keys = ("params", "flops", "latency_ms", "accuracy")
    out: dict[str, Any] = {
        "baseline": {k: report.get("baseline", {}).get(k) for k in keys},
        "pruned": {k: report.get("pruned", {}).get(k) for k in keys},
        "target": report.get("target"),
        "target_met": report.get("target_met"),
    }
    speedup = report.get("speedup")
    out["speedup"] = speedup.get("measured") if isinstance(speedup, dict) else speedup
    out["warnings"] = list(report.get("warnings") or [])  # `hawada status` prints them
    return out


def _store_artifacts(session: Any, store: ArtifactStore, job_id: str, out_dir: Path) -> None:
    """Move every produced file into the artifact store and record size + sha256."""
    for path in sorted(p for p in out_dir.iterdir() if p.is_file()):
        if path.name not in ARTIFACT_NAMES:
            continue  # scratch files of the engine are not artifacts
        size, sha256 = store.write(job_id, path.name, path)
        jobs.record_artifact(session, job_id, path.name, size=size, sha256=sha256)


def execute(job_id: str, settings: Settings | None = None) -> str | None:
    """Run job ``job_id`` to a terminal state; returns that state (None if not claimed).

    Never leaves a claimed job ``running``: every exit path records an outcome.
    """
    settings = settings or get_settings()
    url = settings.database_url
    me = worker_id()
    with session_scope(url) as session:
        job = None
        if jobs.claim_job(session, job_id, me, settings.lease_s):
            job = jobs.load_job(session, job_id)
        if job is None:
            log.info("job %s not claimable (taken, terminal or deleted)", job_id)
            return None
        spec = {
            "recipe": job.recipe,
            "weights": job.weights_path,
            "model_id": job.model_id,
            "owner": job.owner,
            "dataset": job.dataset_path,
            "heldout": job.heldout_path,
            "attempt": job.attempts,
        }

    lease = LeaseKeeper(url, job_id, me, settings.lease_s)
    lease.start()
    var_dir = Path(settings.var_dir)
    checkpoint_dir = workdirs.checkpoint_dir(var_dir, job_id)
    (var_dir / "work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=var_dir / "work"))
    sink = EventSink(url, job_id)
    status, code, message, metrics = "failed", "internal", "", None
    try:
        with MainThreadCanceller(lease.cancel):
            report = _run_pipeline(settings, spec, work, checkpoint_dir, sink, lease.cancel)
        if lease.lost.is_set():
            raise _LeaseLost()
        if lease.cancel.is_set():  # asked while the last phase ran: a cancelled job never succeeds
            raise JobCancelled()
        store = ArtifactStore(Path(settings.artifacts_dir))
        with session_scope(url) as session:
            _store_artifacts(session, store, job_id, work)
        status, metrics = "succeeded", metrics_summary(report)
    except JobCancelled:
        status, code, message = "cancelled", "cancelled", "cancelled by request"
    except _LeaseLost:
        log.warning("job %s: lease lost, leaving it to its new owner", job_id)
        return None
    except HawadaError as exc:
        status, code, message = "failed", exc.code, public_message(exc.message, settings)
    except SoftTimeLimitExceeded:
        status, code = "failed", "time_limit"
        message = f"job exceeded the time limit of {settings.job_time_limit_s:.0f} s"
    except BaseException as exc:
        # The traceback (with server paths) goes to the worker's log; the user gets a reference.
        ref = uuid.uuid4().hex[:12]
        log.error("job %s failed (ref %s)", job_id, ref, exc_info=exc)
        status, code = "failed", "internal"
        message = f"internal error ({type(exc).__name__}); reference {ref} in the worker log"
        if not isinstance(exc, Exception):
            _finish(url, job_id, status, code, message, None)
            raise
    finally:
        lease.stop()
        shutil.rmtree(work, ignore_errors=True)
    if lease.lost.is_set():
        return None
    _finish(url, job_id, status, code, message, metrics)
    # Terminal now: checkpoints exist only to resume a re-queued attempt, and the work folders
    # of earlier (killed) attempts are garbage.
    workdirs.remove_job_leftovers(var_dir, job_id)
    return status


def public_message(message: str, settings: Settings) -> str:
    """`message` without the server's own folders (var, artifacts): users see names, not paths."""
    folders = {Path(settings.var_dir), Path(settings.artifacts_dir)}
    forms = {str(f) for f in folders} | {str(f.resolve()) for f in folders}
    for form in sorted(forms - {"", "."}, key=len, reverse=True):  # innermost folder first
        message = message.replace(form.rstrip("/") + "/", "").replace(form, "<server>")
    return message


class _LeaseLost(Exception):
    """Internal: another worker owns the job now."""


class MainThreadCanceller(threading.Thread):
    """Cancel within seconds in every phase, even inside code that never polls the flag.

    The engine polls the cancel flag between training steps; baseline evaluation, profiling,
    LUT building, evaluation and packaging are long loops that do not. When the flag has been
    set for `grace_s` and the job is still running, this thread signals the main thread (a
    real-time signal: Celery's pool uses SIGUSR1 for soft time limits), whose handler raises
    `JobCancelled` at the next Python bytecode, i.e. within one kernel call. Armed only while
    the pipeline runs, and only where the job runs in the process's main thread (the Celery
    prefork child); elsewhere it does nothing.
    """

    SIGNAL = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2

    def __init__(self, flag: threading.Event, grace_s: float = 1.0) -> None:
        super().__init__(name="hawada-canceller", daemon=True)
        self.flag, self.grace_s = flag, grace_s
        self._armed = threading.Event()
        self._done = threading.Event()
        self._previous: Any = None
        self.usable = threading.current_thread() is threading.main_thread()

    def _handler(self, signum: int, frame: Any) -> None:
        if self._armed.is_set():
            self._armed.clear()  # once: the unwinding code must not be interrupted again
            raise JobCancelled("cancelled")

    def __enter__(self) -> MainThreadCanceller:
        if self.usable:
            self._previous = signal.signal(self.SIGNAL, self._handler)
            self._armed.set()
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.usable:
            self._armed.clear()
            self._done.set()
            signal.signal(self.SIGNAL, self._previous)

    def run(self) -> None:
        main = threading.main_thread().ident
        while not self._done.is_set():
            if self.flag.wait(0.2) and not self._done.wait(self.grace_s):
                if self._armed.is_set() and main is not None:
                    signal.pthread_kill(main, self.SIGNAL)
                return


def _safe(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("could not record an event")


def _finish(
    url: str, job_id: str, status: str, code: str, message: str, metrics: dict[str, Any] | None
) -> None:
    with session_scope(url) as session:
        if status == "succeeded":
            jobs.finish_job(session, job_id, "succeeded", metrics=metrics)
        else:
            jobs.finish_job(session, job_id, status, error={"code": code, "message": message})


def _resolve_weights(settings: Settings, spec: dict[str, Any]) -> Path:
    if spec["weights"]:
        return Path(spec["weights"])
    with session_scope(settings.database_url) as session:
        model = uploaded_models.get_model(session, spec["owner"], spec["model_id"])
    if model is None:
        raise HawadaError(f"model {spec['model_id']} no longer exists", code="model_not_found")
    return Path(model.path)


def _run_pipeline(
    settings: Settings,
    spec: dict[str, Any],
    work: Path,
    checkpoint_dir: Path,
    sink: EventSink,
    cancel: threading.Event,
) -> dict[str, Any]:
    """Build the engine's JobContext and run it (the only place torch gets imported)."""
    from hawada.core.recipe import parse_recipe
    from hawada.worker.lut_cache import StoreLutCache
    from hawada.worker.pipeline import JobContext, run_job

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if spec["attempt"] and spec["attempt"] > 1:
        sink({"kind": "log", "message": f"attempt {spec['attempt']}: resuming from checkpoint"})
    ctx = JobContext(
        recipe=parse_recipe(spec["recipe"]),
        weights=_resolve_weights(settings, spec),
        out_dir=work,
        dataset=Path(spec["dataset"]) if spec["dataset"] else None,
        heldout=Path(spec["heldout"]) if spec.get("heldout") else None,
        device=settings.device,
        on_event=sink,
        should_cancel=cancel.is_set,
        checkpoint_dir=checkpoint_dir,
        lut_cache=StoreLutCache(settings.database_url),
        data_roots=list(settings.data_roots),
        max_dataset_bytes=settings.max_dataset_bytes,
        teacher_dir=settings.teacher_cache_dir,
    )
    return run_job(ctx)


# -- reaper -------------------------------------------------------------------------------
def reap_once(
    settings: Settings | None = None, send: Callable[[str], Any] | None = None
) -> list[str]:
    """Re-queue jobs whose lease lapsed (failing those out of attempts) and re-send them."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        requeued = jobs.requeue_expired(session)
    sweep_leftovers(settings)
    if requeued:
        if send is None:
            from hawada.store.broker import TASK_NAME
            from hawada.worker.app import celery_app

            def send(job_id: str) -> Any:
                return celery_app.send_task(TASK_NAME, args=[job_id])

        for job_id in requeued:
            send(job_id)
        log.warning("re-queued %d job(s) with lapsed leases: %s", len(requeued), requeued)
    return requeued


def sweep_leftovers(settings: Settings) -> list[str]:
    """Remove checkpoints and work folders no attempt can use; returns the job ids swept.

    A job that ended or was deleted needs neither; a queued job has no attempt running, so any
    work folder of it was left by a killed one (its checkpoints stay: the next attempt resumes).
    """
    var_dir = Path(settings.var_dir)
    found: set[str] = set()
    for folder in (var_dir / "checkpoints", workdirs.work_root(var_dir)):
        if folder.is_dir():
            for entry in folder.iterdir():
                job_id = entry.name.split("-", 1)[0]
                if len(job_id) == 32:
                    found.add(job_id)
    if not found:
        return []
    with session_scope(settings.database_url) as session:
        states = jobs.job_states(session, list(found))
    swept = []
    for job_id in found:
        state = states.get(job_id)
        if state is None or state in TERMINAL_STATES:
            workdirs.remove_job_leftovers(var_dir, job_id)
            swept.append(job_id)
        elif state == "queued":
            for folder in workdirs.work_dirs(var_dir, job_id):
                shutil.rmtree(folder, ignore_errors=True)
    return swept


class Heartbeat(threading.Thread):
    """Beats this worker's row in `worker_heartbeats` every ``settings.heartbeat_s``.

    Runs in the Celery parent: /readyz is not ready while no worker beats.
    """

    def __init__(self, settings: Settings, worker: str | None = None) -> None:
        super().__init__(name="hawada-heartbeat", daemon=True)
        self.settings = settings
        self.worker = worker or worker_id()
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                with session_scope(self.settings.database_url) as session:
                    heartbeats.beat(session, self.worker)
            except Exception:
                log.exception("heartbeat failed")
            if self._halt.wait(self.settings.heartbeat_s):
                return

    def stop(self) -> None:
        """Stop beating and remove the row (a clean shutdown is not a dead worker)."""
        self._halt.set()
        try:
            with session_scope(self.settings.database_url) as session:
                heartbeats.forget(session, self.worker)
        except Exception:
            log.exception("could not remove the heartbeat row")


class Reaper(threading.Thread):
    """Runs :func:`reap_once` now and then every ``interval_s`` in the background."""

    def __init__(self, settings: Settings, interval_s: float | None = None) -> None:
        super().__init__(name="hawada-reaper", daemon=True)
        self.settings = settings
        self.interval_s = interval_s or max(5.0, settings.lease_s / 2.0)
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                reap_once(self.settings)
            except Exception:
                log.exception("reaper round failed")
            if self._halt.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Stop after the current round."""
        self._halt.set()
