"""Terminal rendering shared by the `hawada` commands: a progress bar fed by job events and the
before/after table of a report. rich only: the client side and the service side
(`hawada run`) both use it, so it lives in the root package and imports no layer.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


class ProgressView:
    """A one-line rich progress bar fed by job events (phase + progress)."""

    def __init__(self, local: bool = False) -> None:
        self._local = local
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("queued", total=1.0, info="")

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def on_event(self, event: dict[str, Any]) -> None:
        """Apply one engine/API event to the bar."""
        data = event.get("data", event)
        kind = event.get("kind", data.get("kind"))
        if kind == "phase":
            self._progress.update(self._task, description=data.get("phase", ""), info="")
        elif kind == "progress":
            info = "  ".join(
                f"{k} {data[k]:.3g}"
                for k in ("step", "loss", "cost_ratio")
                if isinstance(data.get(k), (int, float))
            )
            self._progress.update(self._task, description=data.get("phase", "training"), info=info)
            if self._local:  # in-process runs have no job row: show the phase's fraction
                self._progress.update(self._task, completed=float(data.get("progress", 0.0)))

    def on_job(self, job: dict[str, Any]) -> None:
        """Apply a polled job (status, phase, overall progress) to the bar."""
        desc = job.get("phase") or job["status"]
        self._progress.update(
            self._task, description=desc, completed=float(job.get("progress") or 0.0)
        )


def fmt(value: Any, unit: str = "") -> str:
    """A table cell: thousands separators for ints, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def before_after_table(report: dict[str, Any]) -> Table:
    """The before/after table of a report (params, FLOPs, latency, held-out accuracy)."""
    base, pruned = report.get("baseline", {}), report.get("pruned", {})
    table = Table(title="HawAda result")
    table.add_column("")
    table.add_column("baseline", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("ratio", justify="right")

    def lat(block: dict[str, Any]) -> Any:
        value = block.get("latency_ms")
        return value.get("median_ms") if isinstance(value, dict) else value

    rows = [
        ("params", base.get("params"), pruned.get("params")),
        ("FLOPs", base.get("flops"), pruned.get("flops")),
        ("latency ms", lat(base), lat(pruned)),
        ("accuracy", base.get("accuracy"), pruned.get("accuracy")),
    ]
    for name, before, after in rows:
        ratio = (
            f"{after / before:.3f}"
            if isinstance(before, (int, float)) and before and isinstance(after, (int, float))
            else "-"
        )
        table.add_row(name, fmt(before), fmt(after), ratio)
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
