"""The client side of the `hawada` command: submit, status, list, watch, cancel, download,
recipes, archs. HTTP only (`HawadaClient`); no torch, no service dependencies.

`register(app)` adds these commands to a Typer app; the `hawada` entry point
(`hawada.cli`) assembles them with the service commands of `hawada.worker.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from hawada.client.client import HawadaAPIError, HawadaClient
from hawada.console import ProgressView, console
from hawada.lifecycle import TERMINAL_STATES

Url = Annotated[str, typer.Option("--url", envvar="HAWADA_URL", help="API base URL.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="HAWADA_API_KEY", help="Bearer key when auth is on."),
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, api_key: str | None) -> HawadaClient:
    return HawadaClient(url, api_key)


def fail(exc: Exception) -> NoReturn:
    """Print an API error the way a user wants to read it and exit non-zero."""
    if isinstance(exc, HawadaAPIError):
        console.print(f"[red]error[/red] {exc.code} ({exc.status}): {escape(exc.message)}")
    else:
        console.print(f"[red]error[/red] {escape(str(exc))}")
    raise typer.Exit(1)


def watch_job(client: HawadaClient, job_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Show a progress bar until the job is terminal; return the final job."""
    job: dict[str, Any] = {}
    with ProgressView() as view:
        for job, events in client.watch(job_id, poll_s=poll_s):
            for event in events:
                view.on_event(event)
            view.on_job(job)
    return job


def _print_outcome(job: dict[str, Any]) -> None:
    status = job["status"]
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "white")
    console.print(f"job {job['id']}: [{colour}]{status}[/{colour}]")
    if job.get("error"):
        error = job["error"]
        console.print(f"  {escape(str(error.get('code')))}: {escape(str(error.get('message')))}")
    if job.get("metrics"):
        console.print_json(data=job["metrics"])


def submit(
    recipe: Annotated[str, typer.Option(help="Recipe file (YAML/JSON).")],
    weights: Annotated[Path | None, typer.Option(help="Weights file.")] = None,
    dataset: Annotated[Path | None, typer.Option(help="Dataset file.")] = None,
    model_id: Annotated[str | None, typer.Option(help="Uploaded model id.")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    watch: Annotated[bool, typer.Option(help="Follow progress until done.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a compression job; prints its id."""
    with _client(url, api_key) as client:
        try:
            job = client.submit(
                recipe, weights, dataset, model_id=model_id, idempotency_key=idempotency_key
            )
            console.print(job["id"] if not watch else f"submitted {job['id']}")
            if watch:
                _print_outcome(watch_job(client, job["id"]))
        except (HawadaAPIError, OSError, ValueError) as exc:
            fail(exc)


def status(
    job_id: str,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
) -> None:
    """Show one job."""
    with _client(url, api_key) as client:
        try:
            job = client.get(job_id)
        except HawadaAPIError as exc:
            fail(exc)
    if as_json:
        console.print_json(data=job)
        return
    console.print(
        f"{job['id']}  {job['status']}  phase={job.get('phase')}  "
        f"progress={float(job.get('progress') or 0):.0%}"
    )
    if job["status"] in TERMINAL_STATES:
        _print_outcome(job)
    for art in job.get("artifacts", []):
        console.print(f"  {art['name']:<22} {art['size']:>12,} B  {art['sha256'][:12]}")


def list_jobs(
    status: Annotated[str | None, typer.Option(help="Filter by status.")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Next-page cursor.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List your jobs, newest first."""
    with _client(url, api_key) as client:
        try:
            page = client.list(status=status, limit=limit, cursor=cursor)
        except HawadaAPIError as exc:
            fail(exc)
    table = Table(box=None)
    table.add_column("id", no_wrap=True, min_width=32)  # ids are copied from here: never wrap
    for name in ("status", "phase", "progress", "created"):
        table.add_column(name)
    for job in page.get("items", []):
        created = str(job.get("created_at", ""))[:19].replace("T", " ")
        table.add_row(
            job["id"],
            job["status"],
            job.get("phase") or "",
            f"{float(job.get('progress') or 0):.0%}",
            created,
        )
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"more: --cursor {page['next_cursor']}")


def watch(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Follow a job's progress until it ends."""
    with _client(url, api_key) as client:
        try:
            job = watch_job(client, job_id)
        except HawadaAPIError as exc:
            fail(exc)
    _print_outcome(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def cancel(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job."""
    with _client(url, api_key) as client:
        try:
            job = client.cancel(job_id)
        except HawadaAPIError as exc:
            fail(exc)
    console.print(f"{job['id']}: {job['status']}")


def download(
    job_id: str,
    out: Annotated[Path, typer.Option(help="Destination folder.")] = Path("."),
    name: Annotated[list[str] | None, typer.Option(help="Artifact name(s).")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's artifacts (all, or --name ...), checking each sha256."""
    out.mkdir(parents=True, exist_ok=True)
    with _client(url, api_key) as client:
        try:
            if name:
                paths = [client.download(job_id, n, out / n) for n in name]
            else:
                paths = client.download_all(job_id, out)
        except Exception as exc:
            fail(exc)
    for path in paths:
        console.print(f"{path}  {path.stat().st_size:,} B  sha256 ok")


def recipes(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the built-in recipes."""
    with _client(url, api_key) as client:
        try:
            body = client.recipes()
        except HawadaAPIError as exc:
            fail(exc)
    console.print_json(data=body)


def archs(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the supported architectures."""
    with _client(url, api_key) as client:
        try:
            body = client.architectures()
        except HawadaAPIError as exc:
            fail(exc)
    console.print_json(data=body)


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    app.command()(submit)
    app.command()(status)
    app.command(name="list")(list_jobs)
    app.command()(watch)
    app.command()(cancel)
    app.command()(download)
    app.command()(recipes)
    app.command()(archs)


__all__ = ["fail", "register", "watch_job"]
