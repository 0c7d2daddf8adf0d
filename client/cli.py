"""The ``hawada`` command: run the service (serve/api/worker), talk to it (submit, status,
list, watch, cancel, download, recipes, archs), run one job in-process (run) and manage
API keys (keys). Torch is imported only by ``run``, lazily."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hawada.client.client import TERMINAL, HawadaAPIError, HawadaClient

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="HawAda: compress torchvision CNNs for a latency budget.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (needs database access).")
app.add_typer(keys_app, name="keys")
console = Console()

Url = Annotated[str, typer.Option("--url", envvar="HAWADA_URL", help="API base URL.")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="HAWADA_API_KEY",
                                               help="Bearer key when auth is on.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, api_key: str | None) -> HawadaClient:
    return HawadaClient(url, api_key)


def _fail(exc: Exception) -> NoReturn:
    """Print an API error the way a user wants to read it and exit non-zero."""
    if isinstance(exc, HawadaAPIError):
        console.print(f"[red]error[/red] {exc.code} ({exc.status}): {exc.message}")
    else:
        console.print(f"[red]error[/red] {exc}")
    raise typer.Exit(1)


# -- running the service ------------------------------------------------------------------
def worker_command(loglevel: str = "INFO") -> list[str]:
    """The Celery worker command line.

    Prefork with one child: tasks run in a forked child process, so the parent (which owns
    the broker connection and the lease reaper) never imports torch nor initialises CUDA; a
    job that crashes the interpreter or leaks GPU memory takes down only the child.
    """
    return [sys.executable, "-m", "celery", "-A", "hawada.worker.app", "worker", "--pool", "prefork",
            "--concurrency", "1", "--loglevel", loglevel, "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-n", f"hawada-{os.getpid()}@%h"]


def _die_with_parent() -> None:
    """In the forked child before exec: get SIGTERM when `serve` dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: serve's finally block is the only stop


def start_worker(env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a Celery worker subprocess in its own session (so Ctrl-C reaches only us);
    it is told to stop if this process dies without cleaning up."""
    out = open(log, "ab") if log else None  # noqa: SIM115 - the child owns the handle
    return subprocess.Popen(worker_command(), env=env, stdout=out, stderr=subprocess.STDOUT
                            if out else None, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_worker(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Warm-stop the worker; kill its whole process group if it does not exit in time."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _init_db() -> None:
    from hawada.core.config import get_settings
    from hawada.store.db import init_db

    settings = get_settings()
    Path(settings.var_dir).mkdir(parents=True, exist_ok=True)
    init_db(settings.database_url)


def _uvicorn(host: str, port: int) -> None:
    import uvicorn

    from hawada.api.main import create_app
    from hawada.core.config import get_settings

    # The default enqueuer of the app sends `hawada.run_job` through worker.app's Celery app.
    uvicorn.run(create_app(get_settings()), host=host, port=port, log_level="info")


@app.command()
def serve(host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port.")] = 8000) -> None:
    """Embedded service: migrate the database, start a Celery worker and the API."""
    _init_db()
    proc = start_worker()
    console.print(f"HawAda serving on [bold]http://{host}:{port}[/bold] "
                  f"(worker pid {proc.pid}); Ctrl-C stops both")
    try:
        _uvicorn(host, port)
    finally:
        stop_worker(proc)


@app.command()
def api(host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port.")] = 8000) -> None:
    """Run the API only (migrates the database first)."""
    _init_db()
    _uvicorn(host, port)


@app.command()
def worker(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Run a Celery worker in the foreground (replaces this process)."""
    cmd = worker_command(loglevel)
    os.execv(cmd[0], cmd)


# -- one job in-process -------------------------------------------------------------------
@app.command()
def run(recipe: Annotated[Path, typer.Option(help="Recipe YAML/JSON file.")],
        weights: Annotated[Path, typer.Option(help="Weights (.safetensors/.pt).")],
        out: Annotated[Path, typer.Option(help="Output folder for the artifacts.")],
        dataset: Annotated[Optional[Path], typer.Option(help="Dataset file (npz).")] = None,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto") -> None:
    """Run one compression job in this process and write the same artifacts as the service."""
    from hawada.core.pipeline import run_local
    from hawada.core.recipe import RecipeError, parse_recipe
    from hawada.core.errors import HawadaError

    try:
        parsed = parse_recipe(recipe.read_text())
    except RecipeError as exc:
        _fail(exc)
    with _ProgressView(local=True) as view:
        try:
            report = run_local(parsed, weights, out, dataset=dataset, device=device,
                               on_event=view.on_event)
        except HawadaError as exc:
            console.print(f"[red]failed[/red] {exc.code}: {exc.message}")
            raise typer.Exit(1) from None
    console.print(before_after_table(report))
    console.print(f"artifacts in [bold]{out}[/bold]")


# -- talking to the service ---------------------------------------------------------------
class _ProgressView:
    """A one-line rich progress bar fed by job events (phase + progress)."""

    def __init__(self, local: bool = False) -> None:
        self._local = local
        self._progress = Progress(TextColumn("{task.description:<12}"), BarColumn(),
                                  TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                                  TimeElapsedColumn(), console=console)
        self._task = self._progress.add_task("queued", total=1.0, info="")

    def __enter__(self) -> _ProgressView:
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
            info = "  ".join(f"{k} {data[k]:.3g}" for k in ("step", "loss", "cost_ratio")
                             if isinstance(data.get(k), (int, float)))
            self._progress.update(self._task, description=data.get("phase", "training"),
                                  info=info)
            if self._local:  # in-process runs have no job row: show the phase's fraction
                self._progress.update(self._task, completed=float(data.get("progress", 0.0)))

    def on_job(self, job: dict[str, Any]) -> None:
        """Apply a polled job (status, phase, overall progress) to the bar."""
        desc = job.get("phase") or job["status"]
        self._progress.update(self._task, description=desc,
                              completed=float(job.get("progress") or 0.0))


def _fmt(value: Any, unit: str = "") -> str:
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

    rows = [("params", base.get("params"), pruned.get("params")),
            ("FLOPs", base.get("flops"), pruned.get("flops")),
            ("latency ms", lat(base), lat(pruned)),
            ("accuracy", base.get("accuracy"), pruned.get("accuracy"))]
    for name, before, after in rows:
        ratio = (f"{after / before:.3f}" if isinstance(before, (int, float)) and before
                 and isinstance(after, (int, float)) else "-")
        table.add_row(name, _fmt(before), _fmt(after), ratio)
    target = report.get("target")
    if isinstance(target, dict) and "target_met" in report:
        goal = (f"<= {target['latency_ms']:.3g} ms" if target.get("latency_ms")
                else f"<= {float(target.get('ratio') or 0):.2f} x baseline")
        table.caption = (f"target: {target.get('metric')} {goal}: "
                         f"{'met' if report['target_met'] else 'missed'}")
    return table


def watch_job(client: HawadaClient, job_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Show a progress bar until the job is terminal; return the final job."""
    job: dict[str, Any] = {}
    with _ProgressView() as view:
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
        console.print(f"  {job['error'].get('code')}: {job['error'].get('message')}")
    if job.get("metrics"):
        console.print_json(data=job["metrics"])


@app.command()
def submit(recipe: Annotated[str, typer.Option(help="Recipe file (YAML/JSON).")],
           weights: Annotated[Optional[Path], typer.Option(help="Weights file.")] = None,
           dataset: Annotated[Optional[Path], typer.Option(help="Dataset file.")] = None,
           model_id: Annotated[Optional[str], typer.Option(help="Uploaded model id.")] = None,
           idempotency_key: Annotated[Optional[str], typer.Option()] = None,
           watch: Annotated[bool, typer.Option(help="Follow progress until done.")] = False,
           url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Submit a compression job; prints its id."""
    with _client(url, api_key) as client:
        try:
            job = client.submit(recipe, weights, dataset, model_id=model_id,
                                idempotency_key=idempotency_key)
            console.print(job["id"] if not watch else f"submitted {job['id']}")
            if watch:
                _print_outcome(watch_job(client, job["id"]))
        except (HawadaAPIError, OSError, ValueError) as exc:
            _fail(exc)


@app.command()
def status(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None,
           as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False) -> None:
    """Show one job."""
    with _client(url, api_key) as client:
        try:
            job = client.get(job_id)
        except HawadaAPIError as exc:
            _fail(exc)
    if as_json:
        console.print_json(data=job)
        return
    console.print(f"{job['id']}  {job['status']}  phase={job.get('phase')}  "
                  f"progress={float(job.get('progress') or 0):.0%}")
    if job["status"] in TERMINAL:
        _print_outcome(job)
    for art in job.get("artifacts", []):
        console.print(f"  {art['name']:<22} {art['size']:>12,} B  {art['sha256'][:12]}")


@app.command(name="list")
def list_jobs(status: Annotated[Optional[str], typer.Option(help="Filter by status.")] = None,
              limit: Annotated[int, typer.Option(help="Page size.")] = 20,
              cursor: Annotated[Optional[str], typer.Option(help="Next-page cursor.")] = None,
              url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List your jobs, newest first."""
    with _client(url, api_key) as client:
        try:
            page = client.list(status=status, limit=limit, cursor=cursor)
        except HawadaAPIError as exc:
            _fail(exc)
    table = Table(box=None)
    table.add_column("id", no_wrap=True, min_width=32)  # ids are copied from here: never wrap
    for name in ("status", "phase", "progress", "created"):
        table.add_column(name)
    for job in page.get("items", []):
        created = str(job.get("created_at", ""))[:19].replace("T", " ")
        table.add_row(job["id"], job["status"], job.get("phase") or "",
                      f"{float(job.get('progress') or 0):.0%}", created)
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"more: --cursor {page['next_cursor']}")


@app.command()
def watch(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Follow a job's progress until it ends."""
    with _client(url, api_key) as client:
        try:
            job = watch_job(client, job_id)
        except HawadaAPIError as exc:
            _fail(exc)
    _print_outcome(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def cancel(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job."""
    with _client(url, api_key) as client:
        try:
            job = client.cancel(job_id)
        except HawadaAPIError as exc:
            _fail(exc)
    console.print(f"{job['id']}: {job['status']}")


@app.command()
def download(job_id: str,
             out: Annotated[Path, typer.Option(help="Destination folder.")] = Path("."),
             name: Annotated[Optional[list[str]], typer.Option(help="Artifact name(s).")] = None,
             url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Download a job's artifacts (all, or --name ...), checking each sha256."""
    out.mkdir(parents=True, exist_ok=True)
    with _client(url, api_key) as client:
        try:
            if name:
                paths = [client.download(job_id, n, out / n) for n in name]
            else:
                paths = client.download_all(job_id, out)
        except Exception as exc:  # noqa: BLE001 - report any failure to the user
            _fail(exc)
    for path in paths:
        console.print(f"{path}  {path.stat().st_size:,} B  sha256 ok")


@app.command()
def recipes(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the built-in recipes."""
    with _client(url, api_key) as client:
        try:
            body = client.recipes()
        except HawadaAPIError as exc:
            _fail(exc)
    console.print_json(data=body)


@app.command()
def archs(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the supported architectures."""
    with _client(url, api_key) as client:
        try:
            body = client.architectures()
        except HawadaAPIError as exc:
            _fail(exc)
    console.print_json(data=body)


# -- keys (store side) --------------------------------------------------------------------
@keys_app.command("create")
def keys_create(owner: Annotated[str, typer.Option(help="Owner the key acts as.")],
                name: Annotated[str, typer.Option(help="A label for the key.")] = "default"
                ) -> None:
    """Create an API key; the secret is printed once and stored only hashed."""
    from hawada.store import keys

    _init_db()
    with _session() as session:
        secret = keys.create_key(session, owner=owner, name=name)
    console.print(f"key for owner {owner!r} (shown once, store it now):")
    print(secret)


@keys_app.command("list")
def keys_list(owner: Annotated[Optional[str], typer.Option()] = None) -> None:
    """List API keys (never their secrets)."""
    from hawada.store import keys

    _init_db()
    table = Table(box=None)
    table.add_column("id", no_wrap=True, min_width=32)
    for name in ("owner", "name", "prefix", "created", "revoked"):
        table.add_column(name)

    def when(t: Any) -> str:
        return t.strftime("%Y-%m-%d %H:%M") if t else ""

    with _session() as session:
        for k in keys.list_keys(session, owner=owner):
            table.add_row(k.id, k.owner, k.name, k.prefix, when(k.created_at), when(k.revoked_at))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key (by id or displayed prefix)."""
    from hawada.store import keys

    _init_db()
    with _session() as session:
        if not keys.revoke_key(session, key_id):
            _fail(LookupError(f"no live key {key_id}"))
    console.print(f"revoked {key_id}")


def _session() -> Any:
    from hawada.core.config import get_settings
    from hawada.store.db import session_scope

    return session_scope(get_settings().database_url)


if __name__ == "__main__":
    app()


__all__ = ["app", "before_after_table", "start_worker", "stop_worker", "worker_command",
           "watch_job"]
