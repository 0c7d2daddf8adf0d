"""Job progress as a user sees it: the event cadence of the pipeline (`log_every`) and the
terminal view (`hawada.console.ProgressView`): timestamped, throttled lines without a terminal,
a live bar with step N/total, loss, cost vs target, elapsed and ETA on one."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console

from hawada.console import ProgressView, before_after_table, clock_text

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _event(seq: int, kind: str, at: float, **data: Any) -> dict[str, Any]:
    """An event as the API returns it, `at` seconds after T0."""
    created = (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    return {"seq": seq, "kind": kind, "created_at": created, "data": {"kind": kind, **data}}


def _training(steps: int = 60, every_s: float = 1.0) -> list[dict[str, Any]]:
    events = [_event(1, "phase", 0.0, phase="training", job_progress=0.15)]
    events += [
        _event(
            step + 1,
            "progress",
            step * every_s,
            phase="training",
            progress=step / steps,
            step=step,
            steps=steps,
            loss=2.0 / step,
            cost_ratio=1.0 - 0.5 * step / steps,
            target=0.5,
            target_ratio=0.5,
            job_progress=0.15 + 0.6 * step / steps,
        )
        for step in range(1, steps + 1)
    ]
    return events


def _plain(events: list[dict[str, Any]], line_every_s: float = 5.0) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=300)
    with ProgressView(console, line_every_s=line_every_s) as view:
        assert view.live is False  # a StringIO is no terminal
        for event in events:
            view.on_event(event)
    return out.getvalue().splitlines()


def test_without_a_terminal_lines_are_timestamped_and_throttled() -> None:
    events = _training()
    events.append(_event(62, "phase", 61.0, phase="exporting", job_progress=0.75))
    events.append(_event(63, "log", 61.5, message="hard-gated vs exported max abs diff 2e-07"))
    lines = _plain(events)
    stamp = datetime.fromtimestamp((T0 + timedelta(seconds=6)).timestamp())
    assert lines[0].startswith(f"{(stamp - timedelta(seconds=6)):%Y-%m-%d %H:%M:%S}  training")
    progress = [line for line in lines if " step " in line]
    # One at the phase's first step, then at most one per 5 s of the job's own clock.
    assert [int(re.search(r"step (\d+)/60", p)[1]) for p in progress] == list(range(1, 60, 5))
    sixth = progress[1]
    assert sixth.startswith(f"{stamp:%Y-%m-%d %H:%M:%S}  training    step 6/60 (10%)")
    assert "loss 0.3333" in sixth and "cost 0.950 → 0.500" in sixth and "job 21%" in sixth
    assert "elapsed 0:06" in sixth and "eta 0:54" in sixth  # 6 s for 10%: 54 s to go
    assert lines[-2].endswith("exporting   started")  # phase changes are never throttled
    assert lines[-1].endswith("info        hard-gated vs exported max abs diff 2e-07")


def test_engine_events_without_timestamps_print_too() -> None:
    """`hawada run` feeds the engine's flat dicts (no created_at, no job_progress)."""
    lines = _plain(
        [
            {"kind": "phase", "phase": "training"},
            {
                "kind": "progress",
                "phase": "training",
                "progress": 0.5,
                "step": 3,
                "steps": 6,
                "loss": 0.5,
                "cost_ratio": 0.8,
                "target_ratio": 0.5,
            },
        ]
    )
    assert len(lines) == 2 and "step 3/6 (50%)" in lines[1] and "cost 0.800 → 0.500" in lines[1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  training", lines[1])


def test_on_a_terminal_one_live_line_has_everything() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    with ProgressView(console) as view:
        assert view.live is True
        for event in _training()[:31]:  # up to step 30 of 60
            view.on_event(event)
    screen = out.getvalue()
    for text in ("training", "step 30/60", "loss 0.06667", "cost 0.750 → 0.500", "job 45%"):
        assert text in screen, text
    assert re.search(r"eta \d+:\d\d", screen) and re.search(r"\d+:\d\d eta", screen)


def test_clock_text() -> None:
    assert [clock_text(s) for s in (None, 0, 59.6, 61, 3725)] == ["-", "0:00", "1:00", "1:01",
                                                                  "1:02:05"]  # fmt: skip


def test_progress_events_come_every_log_every_steps_and_at_the_end() -> None:
    """The cadence bug: events came every ~3 steps with log_every 10 (a 2 s timer won)."""
    from hawada.worker.pipeline import JobContext, _progress_emitter

    events: list[dict[str, Any]] = []
    ctx = JobContext(recipe=None, weights=None, out_dir=None, on_event=events.append)  # type: ignore[arg-type]
    emit = _progress_emitter(ctx, "training", log_every=10, target_ratio=0.5)
    for step in range(1, 26):
        emit({"step": step, "steps": 25, "loss": 1.0, "cost_ratio": 0.9, "target": 0.6})
    assert [e["step"] for e in events] == [10, 20, 25]
    assert events[-1] == {
        "kind": "progress",
        "phase": "training",
        "progress": 1.0,
        "step": 25,
        "steps": 25,
        "loss": 1.0,
        "cost_ratio": 0.9,
        "target": 0.6,
        "target_ratio": 0.5,
    }


def test_before_after_table_gives_accuracy_error_and_latency_range() -> None:
    def lat(median: float) -> dict:
        return {"median_ms": median, "p10_ms": median * 0.9, "p90_ms": median * 1.2}

    report = {
        "baseline": {"params": 100, "flops": 400, "latency_ms": 2.0, "latency": lat(2.0),
                     "accuracy": 0.95},
        "pruned": {"params": 50, "flops": 200, "latency_ms": 1.0, "latency": lat(1.0),
                   "accuracy": 0.9},
        "heldout": {"source": "split", "size": 400},  # no stderr given: sqrt(p(1-p)/n)
        "target": {"metric": "flops", "ratio": 0.5},
        "target_met": True,
    }  # fmt: skip
    out = Console(record=True, width=120)
    out.print(before_after_table(report))
    text = out.export_text()
    assert "95.0% ± 1.1%" in text and "90.0% ± 1.5%" in text
    assert "2 (1.8-2.4)" in text and "1 (0.9-1.2)" in text
    assert "target: flops <= 0.50 x baseline: met" in text
