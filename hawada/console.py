"""Terminal rendering shared by the `hawada` commands: job progress fed by events and the
before/after table of a report. rich only: the client side and the service side (`hawada run`)
both use it, so it lives in the root package and imports no layer.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

#: Standard output: results, tables, ids.
console = Console()
#: Standard error: progress and diagnostics (so `JOB=$(hawada submit ...)` captures only the id).
err_console = Console(stderr=True)

#: Without a terminal, a progress line at most this often (phase changes and logs always print).
LINE_EVERY_S = 5.0


def clock_text(seconds: float | None) -> str:
    """``h:mm:ss`` / ``m:ss`` for a duration; ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _event_time(event: dict[str, Any]) -> float | None:
    created = event.get("created_at")
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def flatten_event(event: dict[str, Any]) -> dict[str, Any]:
    """One event as a flat dict: the API's ``{"seq", "kind", "created_at", "data": {...}}`` and
    the engine's own flat dicts (``hawada run``) both become ``{"kind", "phase", ...}``."""
    data = event.get("data")
    if isinstance(data, dict):
        flat = {**data, "kind": event.get("kind", data.get("kind"))}
        if "created_at" in event:
            flat["created_at"] = event["created_at"]
        return flat
    return dict(event)


class _RemainingColumn(ProgressColumn):
    """``eta m:ss`` counted down live from the estimate made at the last event."""

    def render(self, task: Task) -> Text:
        eta_at = task.fields.get("eta_at")
        left = None if eta_at is None else max(0.0, eta_at - time.time())
        return Text(f"eta {clock_text(left)}", style="progress.remaining")


class _ElapsedColumn(ProgressColumn):
    """``m:ss`` since the job started (its first event), counted live."""

    def render(self, task: Task) -> Text:
        t0 = task.fields.get("t0")
        elapsed = None if t0 is None else time.time() - t0
        return Text(f"elapsed {clock_text(elapsed)}", style="progress.elapsed")


class ProgressView:
    """Job progress from events: a live bar on a terminal, timestamped lines otherwise.

    On a terminal one line shows the phase, a bar over the phase's steps, ``step N/total``,
    the loss, the cost ratio against its target, the job's overall progress, the elapsed time
    and the phase's ETA. Without a terminal (CI, a log file) it prints one line per phase
    change and log message and a progress line at most every ``line_every_s`` seconds.
    Times come from the events' ``created_at`` when they have one (so replayed history keeps
    its times), otherwise from the clock. Use as a context manager; feed :meth:`on_event`.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        live: bool | None = None,
        line_every_s: float = LINE_EVERY_S,
    ) -> None:
        self.console = console or err_console
        self.live = (
            self.console.is_terminal and not self.console.is_dumb_terminal if live is None else live
        )
        self.line_every_s = line_every_s
        self.start: float | None = None
        self.phase: str | None = None
        self.phase_start: float | None = None
        self.state: dict[str, Any] = {}
        self._last_line = float("-inf")
        self._progress: Progress | None = None
        self._task: Any = None
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description:<11}"),
                BarColumn(bar_width=28),
                TextColumn("{task.fields[steps]}"),
                TextColumn("{task.fields[info]}"),
                _ElapsedColumn(),
                _RemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task(
                "waiting", total=None, steps="", info="", t0=None, eta_at=None
            )

    def __enter__(self) -> ProgressView:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    # -- events -----------------------------------------------------------------------------
    def on_event(self, event: dict[str, Any]) -> None:
        """Apply one event (API shape or the engine's flat dict)."""
        flat = flatten_event(event)
        kind = flat.get("kind")
        now = _event_time(flat) or time.time()
        if self.start is None:
            self.start = now
        phase = flat.get("phase")
        if kind == "phase" or (kind == "progress" and phase and phase != self.phase):
            self._new_phase(str(phase or ""), now)
        if kind == "progress":
            self.state = flat
            self._progress_update(flat, now)
        elif kind == "log":
            message = str(flat.get("message", "")).strip().splitlines()
            if message:
                level = flat.get("level", "info")
                self._line(now, f"{level:<11} {message[0] if level != 'error' else message[-1]}")
        elif kind not in ("phase", "progress") and kind:
            self._line(now, f"{kind}")

    def _new_phase(self, phase: str, now: float) -> None:
        self.phase, self.phase_start, self.state = phase, now, {}
        if self._progress is not None:
            self._progress.update(
                self._task,
                description=phase,
                total=None,
                completed=0,
                steps="",
                info="",
                t0=self.start,
                eta_at=None,
            )
        else:
            self._line(now, f"{phase:<11} started")
            self._last_line = float("-inf")  # the phase's first progress line is not throttled

    def _progress_update(self, ev: dict[str, Any], now: float) -> None:
        step, steps = ev.get("step"), ev.get("steps")
        fraction = ev.get("progress")
        done = step if isinstance(step, int) else 0
        total = steps if isinstance(steps, int) and isinstance(step, int) else 0
        counted = total > 0
        if counted:
            fraction = done / total
        eta = None
        if isinstance(fraction, (int, float)) and fraction > 0 and self.phase_start is not None:
            eta = (now - self.phase_start) * (1.0 - fraction) / fraction
        steps_text = f"step {step}/{steps}" if step is not None and steps else ""
        if self._progress is not None:
            self._progress.update(
                self._task,
                total=total if counted else (1.0 if fraction is not None else None),
                completed=done if counted else float(fraction or 0.0),
                steps=steps_text,
                info=self.details(ev),
                t0=self.start,
                eta_at=None if eta is None else time.time() + eta,
            )
            return
        if now - self._last_line < self.line_every_s:
            return
        self._last_line = now
        pct = f" ({fraction:.0%})" if isinstance(fraction, (int, float)) else ""
        parts = [f"{steps_text}{pct}".strip(), self.details(ev)]
        parts += [f"elapsed {clock_text(now - (self.start or now))}", f"eta {clock_text(eta)}"]
        self._line(now, f"{self.phase or '':<11} " + "  ".join(p for p in parts if p))

    @staticmethod
    def details(ev: dict[str, Any]) -> str:
        """``loss 0.812  cost 0.731 → 0.500  job 43%`` from a progress event."""
        out = []
        if isinstance(ev.get("loss"), (int, float)):
            out.append(f"loss {ev['loss']:.4g}")
        cost, target = ev.get("cost_ratio"), ev.get("target_ratio", ev.get("target"))
        if isinstance(cost, (int, float)):
            goal = f" → {target:.3f}" if isinstance(target, (int, float)) else ""
            out.append(f"cost {cost:.3f}{goal}")
        if isinstance(ev.get("job_progress"), (int, float)):
            out.append(f"job {ev['job_progress']:.0%}")
        return "  ".join(out)

    def _line(self, when: float, text: str) -> None:
        stamp = datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{stamp}  {escape(text)}"
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, soft_wrap=True)
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def on_job(self, job: dict[str, Any]) -> None:
        """Apply a polled job (status, phase, overall progress)."""
        if self._progress is not None:
            self._progress.update(self._task, description=job.get("phase") or job["status"])


def fmt(value: Any, unit: str = "") -> str:
    """A table cell: thousands separators for ints, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _stderr(report: dict[str, Any], block: str, accuracy: Any) -> float | None:
    """The accuracy's standard error: report.json's heldout block, else sqrt(p(1-p)/n)."""
    heldout = report.get("heldout") if isinstance(report.get("heldout"), dict) else {}
    assert isinstance(heldout, dict)
    given = heldout.get("stderr_baseline" if block == "baseline" else "stderr")
    if isinstance(given, (int, float)):
        return float(given)
    n = heldout.get("size") or (report.get("data") or {}).get("n_heldout")
    if isinstance(accuracy, (int, float)) and isinstance(n, int) and n > 0:
        return float((accuracy * (1 - accuracy) / n) ** 0.5)
    return None


def before_after_table(report: dict[str, Any]) -> Table:
    """The before/after table of a report (params, FLOPs, latency, held-out accuracy).

    From a full report.json the accuracy cells carry their standard error and the latency
    cells their p10-p90 range; from a job's ``metrics`` (headline numbers only) the bare values.
    """
    base, pruned = report.get("baseline", {}), report.get("pruned", {})
    table = Table(title="HawAda result")
    table.add_column("")
    table.add_column("baseline", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("ratio", justify="right")

    def lat(block: dict[str, Any]) -> Any:
        value = block.get("latency_ms")
        return value.get("median_ms") if isinstance(value, dict) else value

    def lat_cell(block: dict[str, Any]) -> str:
        spread = block.get("latency")
        text = fmt(lat(block))
        if isinstance(spread, dict) and isinstance(spread.get("p10_ms"), (int, float)):
            text += f" ({spread['p10_ms']:.3g}-{spread['p90_ms']:.3g})"
        return text

    def acc_cell(name: str, block: dict[str, Any]) -> str:
        acc = block.get("accuracy")
        if not isinstance(acc, (int, float)):
            return fmt(acc)
        se = _stderr(report, name, acc)
        return f"{acc:.1%}" + (f" ± {se:.1%}" if se is not None else "")

    rows = [
        ("params", base.get("params"), pruned.get("params"), fmt(base.get("params")), None),
        ("FLOPs", base.get("flops"), pruned.get("flops"), fmt(base.get("flops")), None),
        (
            "latency ms (p10-p90)" if isinstance(base.get("latency"), dict) else "latency ms",
            lat(base),
            lat(pruned),
            lat_cell(base),
            lat_cell(pruned),
        ),
        (
            "held-out accuracy",
            base.get("accuracy"),
            pruned.get("accuracy"),
            acc_cell("baseline", base),
            acc_cell("pruned", pruned),
        ),
    ]
    for name, before, after, before_text, after_text in rows:
        ratio = (
            f"{after / before:.3f}"
            if isinstance(before, (int, float)) and before and isinstance(after, (int, float))
            else "-"
        )
        table.add_row(
            name, before_text, after_text if after_text is not None else fmt(after), ratio
        )
    target = report.get("target")
    if isinstance(target, dict) and "target_met" in report:
        goal = (
            f"<= {target['latency_ms']:.3g} ms"
            if target.get("latency_ms")
            else f"<= {float(target.get('ratio') or 0):.2f} x baseline"
        )
        table.caption = (
            f"target: {target.get('metric')} {goal}: {'met' if report['target_met'] else 'missed'}"
        )
    return table


def report_warnings(report: dict[str, Any]) -> list[str]:
    """The report's warnings as one line each (``report["warnings"]``, when present)."""
    out = []
    for warning in report.get("warnings") or []:
        if isinstance(warning, dict):
            out.append(str(warning.get("message", warning)))
        else:
            out.append(str(warning))
    return out
