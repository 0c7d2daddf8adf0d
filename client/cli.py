"""The client side of the `hawada` command: submit, status, list, watch, cancel, delete,
download, recipes, archs. HTTP only (`HawadaClient`); no torch, no service dependencies.

`register(app)` adds these commands to a Typer app; the `hawada` entry point
(`hawada.cli`) assembles them with the service commands of `hawada.worker.cli`.

Exit codes (docs/cli.md): 0 success (the job succeeded, or is still on its way for `status`),
1 the job failed or was cancelled, 2 a usage error, a file not found, an error answer from the
API or an unreachable service. Results go to standard output, progress and errors to standard
error, so `JOB=$(hawada submit ...)` captures only the job id.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hawada.client.client import (
    ChecksumError,
    HawadaAPIError,
    HawadaClient,
    HawadaConnectionError,
)
from hawada.console import ProgressView, before_after_table, console, err_console
from hawada.lifecycle import TERMINAL_STATES

EXIT_OK, EXIT_JOB, EXIT_USAGE = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8000"

Url = Annotated[
    str, typer.Option("--url", envvar="HAWADA_URL", help="API base URL.", show_default=True)
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="HAWADA_API_KEY", help="Bearer key when auth is on."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def _client(url: str, api_key: str | None) -> HawadaClient:
    return HawadaClient(url, api_key)


def error(message: str) -> None:
    """One `error ...` line on standard error."""
    err_console.print(f"[red]error[/red] {escape(message)}", soft_wrap=True, highlight=False)


def unreachable_message(url: str, reason: str) -> str:
    """The one line printed when nothing answers at ``url``."""
    return (
        f"cannot reach {url} ({reason}); is the service running (hawada serve)? "
        "Set its address with --url URL or HAWADA_URL=URL"
    )


def fail(exc: Exception) -> NoReturn:
    """Print an error the way a user wants to read it and exit with code 2."""
    if isinstance(exc, HawadaConnectionError):
        error(unreachable_message(exc.url, exc.reason))
    elif isinstance(exc, HawadaAPIError):
        error(f"{exc.code} ({exc.status}): {exc.message}")
        for item in exc.details:
            if isinstance(item, dict) and "message" in item:
                where = f"{item.get('path')}: " if item.get("path") else ""
                err_console.print(f"  {escape(where + str(item['message']))}", highlight=False)
    else:
        error(str(exc))
    raise typer.Exit(EXIT_USAGE)


@contextmanager
def handled() -> Iterator[None]:
    """Turn the client's errors into one line and exit code 2 (Ctrl-C: 130)."""
    try:
        yield
    except (HawadaConnectionError, HawadaAPIError, ChecksumError, FileNotFoundError) as exc:
        fail(exc)
    except (ValueError, TypeError) as exc:  # e.g. --model-id together with --weights
        fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def _require_file(path: Path | None) -> None:
    if path is not None and not path.is_file():
        error(f"file not found: {path}")
        raise typer.Exit(EXIT_USAGE)


def print_table(table: Table) -> None:
    """A table on stdout; without a terminal (a file, a pipe) rows are never wrapped or cut."""
    if console.is_terminal:
        console.print(table)
    else:
        wide = Console(file=console.file, width=max(console.width, 240), no_color=True)
        wide.print(table, crop=False)


def job_exit_code(job: dict[str, Any]) -> int:
    """0 succeeded (or not finished), 1 failed or cancelled."""
    return EXIT_JOB if job.get("status") in ("failed", "cancelled") else EXIT_OK


def follow(
    client: HawadaClient,
    job_id: str,
    *,
    as_json: bool = False,
    poll_s: float = 1.0,
    out: Console | None = None,
) -> dict[str, Any]:
    """Follow a job's events to its end and return the final job: progress on ``out``
    (default standard error), or with ``as_json`` each event as a JSON line on stdout."""
    if as_json:
        for event in client.watch(job_id, poll_s=poll_s):
            print(json.dumps(event), flush=True)
        return client.get(job_id)
    with ProgressView(out) as view:
        for event in client.watch(job_id, poll_s=poll_s):
            view.on_event(event)
        job = client.get(job_id)
        view.on_job(job)
    return job


def print_outcome(job: dict[str, Any]) -> None:
    """The end of a job: status, error or the before/after numbers, and the warnings."""
    status = job["status"]
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "white")
    console.print(f"job {job['id']}: [{colour}]{status}[/{colour}]", highlight=False)
    if job.get("error"):
        err = job["error"]
        console.print(f"  {escape(str(err.get('code')))}: {escape(str(err.get('message')))}")
    metrics = job.get("metrics")
    if isinstance(metrics, dict) and metrics.get("baseline"):
        console.print(before_after_table(metrics))
        for warning in metrics.get("warnings") or []:
            text = warning.get("message", warning) if isinstance(warning, dict) else warning
            console.print(f"[yellow]warning[/yellow] {escape(str(text))}", highlight=False)


# -- commands -------------------------------------------------------------------------------
def submit(
    recipe: Annotated[Path, typer.Option(help="Recipe file (YAML or JSON).")],
    weights: Annotated[
        Path | None, typer.Option(help="Weights file (.safetensors, or a .pt/.pth state dict).")
    ] = None,
    dataset: Annotated[Path | None, typer.Option(help="Dataset file (.npz with x, y).")] = None,
    heldout: Annotated[
        Path | None, typer.Option(help="Held-out set (.npz) instead of a seeded split.")
    ] = None,
    model_id: Annotated[
        str | None, typer.Option(help="Use weights uploaded before (POST /v1/models).")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe key: the same key returns the same job.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", "--watch", help="Follow progress until the job ends."),
    ] = False,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a compression job and print its id (with --wait: follow it to the end).

    Exit code with --wait: 0 succeeded, 1 failed or cancelled, 2 usage/connection error.
    """
    _require_file(recipe)
    _require_file(weights)
    _require_file(dataset)
    _require_file(heldout)
    with handled(), _client(url, api_key) as client:
        job = client.submit(
            recipe,
            weights,
            dataset,
            heldout=heldout,
            model_id=model_id,
            idempotency_key=idempotency_key,
        )
        if not wait:
            if as_json:
                console.print_json(data=job)
            else:
                print(job["id"])
            return
        err_console.print(f"submitted job {job['id']}", highlight=False)
        job = follow(client, job["id"], as_json=as_json)
    if not as_json:
        print_outcome(job)
    raise typer.Exit(job_exit_code(job))


def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show one job: status, phase, progress, the result and its artifacts.

    Exit code: 0 succeeded, queued or running; 1 failed or cancelled; 2 usage/connection error.
    """
    with handled(), _client(url, api_key) as client:
        job = client.get(job_id)
    if as_json:
        console.print_json(data=job)
        raise typer.Exit(job_exit_code(job))
    line = f"{job['id']}  {job['status']}"
    if job["status"] not in TERMINAL_STATES:
        line += f"  {job.get('phase') or ''}  {float(job.get('progress') or 0):.0%}"
    console.print(line, highlight=False)
    if job["status"] in TERMINAL_STATES:
        print_outcome(job)
    for art in job.get("artifacts", []):
        console.print(
            f"  {art['name']:<22} {art['size']:>12,} B  sha256 {art['sha256'][:12]}",
            highlight=False,
        )
    raise typer.Exit(job_exit_code(job))


def list_jobs(
    status: Annotated[
        str | None, typer.Option(help="Only jobs in this state (e.g. running, failed).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Page size (1-200).")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Next-page cursor printed below.")] = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List your jobs, newest first."""
    with handled(), _client(url, api_key) as client:
        page = client.list(status=status, limit=limit, cursor=cursor)
    if as_json:
        console.print_json(data=page)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=32)  # ids are copied from here: never wrap
    for name in ("status", "phase", "progress", "created"):
        table.add_column(name, no_wrap=True)
    for job in page.get("items", []):
        created = str(job.get("created_at", ""))[:19].replace("T", " ")
        table.add_row(
            job["id"],
            job["status"],
            job.get("phase") or "",
            f"{float(job.get('progress') or 0):.0%}",
            created,
        )
    print_table(table)
    if not page.get("items"):
        err_console.print("no jobs")
    if page.get("next_cursor"):
        err_console.print(f"more: --cursor {page['next_cursor']}", highlight=False)


def watch(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each event as one JSON line.")
    ] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Follow a job's progress (Server-Sent Events) until it ends.

    A live bar on a terminal; timestamped lines when the output is a file or a pipe.
    Exit code: 0 succeeded, 1 failed or cancelled, 2 usage/connection error.
    """
    with handled(), _client(url, api_key) as client:
        job = follow(client, job_id, as_json=as_json)
    if not as_json:
        print_outcome(job)
    raise typer.Exit(job_exit_code(job))


def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Cancel a job (a running one winds down at its next step)."""
    with handled(), _client(url, api_key) as client:
        job = client.cancel(job_id)
    console.print(f"{job['id']}: {job['status']}", highlight=False)


def delete(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a finished job with its events and artifacts."""
    with handled(), _client(url, api_key) as client:
        client.delete(job_id)
    console.print(f"deleted {job_id}", highlight=False)


def download(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    out: Annotated[Path, typer.Option(help="Destination folder.")] = Path("."),
    name: Annotated[list[str] | None, typer.Option(help="Only this artifact (repeatable).")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a job's artifacts (all, or --name ...), checking each one's sha256.

    Exit code: 0 downloaded, 1 the job failed or was cancelled (nothing to download),
    2 not finished yet, usage/connection error or a checksum mismatch.
    """
    with handled(), _client(url, api_key) as client:
        job = client.get(job_id)
        if job["status"] in ("failed", "cancelled"):
            err = job.get("error") or {}
            reason = f" ({err.get('code')}: {err.get('message')})" if err else ""
            error(f"job {job_id} {job['status']}{reason}: it has no artifacts")
            raise typer.Exit(EXIT_JOB)
        if job["status"] != "succeeded":
            error(
                f"job {job_id} is {job['status']}: artifacts come when it succeeds "
                f"(hawada watch {job_id})"
            )
            raise typer.Exit(EXIT_USAGE)
        out.mkdir(parents=True, exist_ok=True)
        listed = {a["name"]: a for a in job.get("artifacts", [])}
        for wanted in name or []:
            if wanted not in listed:
                raise FileNotFoundError(
                    f"job {job_id} has no artifact {wanted!r} (it has: {', '.join(listed)})"
                )
        paths = [
            client.download(job_id, n, out / n, sha256=listed[n]["sha256"])
            for n in (name or list(listed))
        ]
    for path in paths:
        console.print(f"{path}  {path.stat().st_size:,} B  sha256 ok", highlight=False)


def recipes(
    name: Annotated[
        str | None, typer.Argument(help="Print this recipe as YAML (to start your own).")
    ] = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List the built-in recipes, or print one of them."""
    with handled(), _client(url, api_key) as client:
        body = client.recipes()
    items = body.get("items", [])
    if name is not None:
        chosen = [r for r in items if r.get("name") == name]
        if not chosen:
            error(f"no recipe {name!r}; built-in: {', '.join(r['name'] for r in items)}")
            raise typer.Exit(EXIT_USAGE)
        recipe = chosen[0]["recipe"]
        if as_json:
            console.print_json(data=recipe)
        else:
            print(yaml.safe_dump(recipe, sort_keys=False), end="")
        return
    if as_json:
        console.print_json(data=body)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("name", "arch", "classes", "input", "data", "target", "steps", "finetune"):
        table.add_column(column, no_wrap=True)
    for item in items:
        r = item.get("recipe", {})
        model, data, target = r.get("model", {}), r.get("data", {}), r.get("target", {})
        goal = (
            f"{target.get('latency_ms')} ms"
            if target.get("latency_ms")
            else f"{target.get('ratio')}x"
        )
        table.add_row(
            item.get("name", ""),
            str(model.get("arch", "")),
            str(model.get("num_classes", "")),
            "x".join(str(v) for v in model.get("input_size", [])),
            str(data.get("source", "")),
            f"{target.get('metric', '')} {goal}",
            str(r.get("train", {}).get("steps", "")),
            f"{r.get('finetune', {}).get('epochs', '')} ep",
        )
    print_table(table)


def archs(
    name: Annotated[
        str | None,
        typer.Argument(help="Print the coupling groups of this architecture (members, widths)."),
    ] = None,
    as_json: AsJson = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """List the architectures a recipe's model.arch may name (and those that cannot be used,
    with the reason), or the coupling groups of one of them."""
    with handled(), _client(url, api_key) as client:
        body = client.architectures()
    items = body.get("items", [])
    unsupported = body.get("unsupported", [])
    if name is not None:
        chosen = [a for a in items if a.get("name") == name]
        if not chosen:
            why = [u.get("reason") for u in unsupported if u.get("name") == name]
            detail = f"not supported: {why[0]}" if why else "unknown"
            error(f"architecture {name!r} is {detail}; supported: {len(items)} (hawada archs)")
            raise typer.Exit(EXIT_USAGE)
        groups = chosen[0].get("groups", [])
        if as_json:
            console.print_json(data=chosen[0])
            return
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("group", "channels", "unit", "residual", "modules"):
            table.add_column(column, no_wrap=column == "group")
        for g in groups:
            table.add_row(
                str(g.get("name", "")),
                str(g.get("channels", "")),
                str(g.get("unit_width", "")),
                _cell(g.get("residual")),
                ", ".join(g.get("modules", [])),
            )
        print_table(table)
        return
    if as_json:
        console.print_json(data=body)
        return
    columns = ["name", "family"]
    for item in items:  # whatever else the API lists per architecture, in its order
        columns += [
            k for k, v in item.items() if k not in columns and not isinstance(v, (dict, list))
        ]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in (*columns, "groups", "channels"):
        table.add_column(column, no_wrap=column == "name")
    for item in items:
        groups = item.get("groups", [])
        table.add_row(
            *(_cell(item.get(c)) for c in columns),
            str(len(groups)),
            str(sum(int(g.get("channels", 0)) for g in groups)),
        )
    print_table(table)
    if unsupported:
        listing = Table(box=None, header_style="bold", pad_edge=False, title="not supported")
        for column in ("name", "family", "reason"):
            listing.add_column(column, no_wrap=column == "name")
        for u in unsupported:
            listing.add_row(*(_cell(u.get(c)) for c in ("name", "family", "reason")))
        print_table(listing)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


#: One example per command, shown at the end of its --help.
EXAMPLES = {
    "submit": "hawada submit --recipe recipes/demo-digits.yaml --weights baseline.safetensors "
    "--wait",
    "status": "hawada status 3f2c0e6a4d2f4c5e8a7b6c5d4e3f2a1b",
    "list": "hawada list --status running",
    "watch": "hawada watch 3f2c0e6a4d2f4c5e8a7b6c5d4e3f2a1b",
    "cancel": "hawada cancel 3f2c0e6a4d2f4c5e8a7b6c5d4e3f2a1b",
    "delete": "hawada delete 3f2c0e6a4d2f4c5e8a7b6c5d4e3f2a1b",
    "download": "hawada download 3f2c0e6a4d2f4c5e8a7b6c5d4e3f2a1b --out result/",
    "recipes": "hawada recipes resnet > my-recipe.yaml",
    "archs": "hawada archs mobilenet_v3_small",
}


def example(command: str) -> str:
    """The --help epilog of a command."""
    return f"Example: {EXAMPLES[command]}"


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    commands: dict[str, Callable[..., Any]] = {
        "submit": submit,
        "status": status,
        "list": list_jobs,
        "watch": watch,
        "cancel": cancel,
        "delete": delete,
        "download": download,
        "recipes": recipes,
        "archs": archs,
    }
    for name, fn in commands.items():
        app.command(name=name, epilog=example(name))(fn)


__all__ = [
    "EXIT_JOB",
    "EXIT_OK",
    "EXIT_USAGE",
    "error",
    "fail",
    "follow",
    "handled",
    "print_outcome",
    "register",
    "unreachable_message",
]
