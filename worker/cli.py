"""The service side of the `hawada` command: serve, api, worker, run and keys.

`register(app)` adds these commands to a Typer app (`hawada.cli` assembles them with the client
commands). This module imports only typer, rich and the root package, so `hawada --help` works
with the base install; each command imports what it needs when it runs and, when an extra is
missing, fails with one line naming it (exit code 2). The API is started by its import string
(`hawada.api.main:create_app`), so nothing here imports the API.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.markup import escape

from hawada.console import ProgressView, before_after_table, console, report_warnings
from hawada.extras import MissingExtra, require

#: The API application factory, by import string (uvicorn imports it in this process).
API_FACTORY = "hawada.api.main:create_serving_app"

#: One example per command, shown at the end of its --help.
EXAMPLES = {
    "serve": "hawada serve --port 8000",
    "api": "HAWADA_DATABASE_URL=postgresql+psycopg://... hawada api --host 0.0.0.0",
    "worker": "HAWADA_BROKER_URL=redis://127.0.0.1:6379/0 hawada worker",
    "run": "hawada run --recipe recipes/demo-digits.yaml --weights w.safetensors --out result/",
    "keys": "hawada keys create --owner alice --name laptop",
    "worker-alive": "hawada worker-alive  # exit 0 when this host's worker beats its heartbeat",
    "keys create": "hawada keys create --owner alice --name laptop",
    "keys list": "hawada keys list --owner alice",
    "keys revoke": "hawada keys revoke 1f0c2a9e",
}

keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (needs database access).")


def _require(*extras: str, what: str) -> None:
    """One clear line and exit code 2 when an extra this command needs is not installed."""
    try:
        require(*extras, what=what)
    except MissingExtra as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


# -- running the service ------------------------------------------------------------------
def worker_command(loglevel: str = "INFO") -> list[str]:
    """The Celery worker command line.

    Prefork with one child: tasks run in a forked child process, so the parent (which owns
    the broker connection and the lease reaper) never imports torch nor initialises CUDA; a
    job that crashes the interpreter or leaks GPU memory takes down only the child.
    """
    return [
        sys.executable, "-m", "celery", "-A", "hawada.worker.app", "worker",
        "--pool", "prefork", "--concurrency", "1", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"hawada-{os.getpid()}@%h",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the forked child before exec: get SIGTERM when `serve` dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: serve's finally block is the only stop


def start_worker(
    env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a Celery worker subprocess in its own session (so Ctrl-C reaches only us);
    it is told to stop if this process dies without cleaning up."""
    out: IO[bytes] | None = open(log, "ab") if log else None  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        worker_command(),
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def stop_worker(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
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


class WorkerSupervisor(threading.Thread):
    """Keeps one Celery worker running for `hawada serve`: a worker that exits (crash, OOM kill,
    SIGKILL) is restarted after a backoff that doubles per quick failure (1 s .. 30 s) and
    resets once a worker has lived `healthy_s`."""

    def __init__(
        self,
        start: Callable[[], subprocess.Popen[bytes]] = start_worker,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        healthy_s: float = 60.0,
    ) -> None:
        super().__init__(name="hawada-worker-supervisor", daemon=True)
        self._start = start
        self.min_backoff_s, self.max_backoff_s, self.healthy_s = (
            min_backoff_s,
            max_backoff_s,
            healthy_s,
        )
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.delays: list[float] = []  # each restart's backoff, in order

    def _spawn(self) -> bool:
        with self._lock:
            if self._halt.is_set():
                return False
            self.proc = self._start()
            self.starts += 1
            return True

    def run(self) -> None:
        backoff = self.min_backoff_s
        while self._spawn():
            assert self.proc is not None
            started = time.monotonic()
            while self.proc.poll() is None:
                if self._halt.wait(0.5):
                    return
            if time.monotonic() - started >= self.healthy_s:
                backoff = self.min_backoff_s
            console.print(
                f"[yellow]worker (pid {self.proc.pid}) exited with code {self.proc.returncode}; "
                f"restarting in {backoff:.0f} s[/yellow]"
            )
            self.delays.append(backoff)
            if self._halt.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)

    def stop(self) -> None:
        """Stop supervising and stop the current worker."""
        with self._lock:
            self._halt.set()
            proc = self.proc
        if proc is not None:
            stop_worker(proc)


def _init_db() -> None:
    from hawada.settings import get_settings
    from hawada.store.broker import ensure_broker_folders
    from hawada.store.db import init_db

    settings = get_settings()
    Path(settings.var_dir).mkdir(parents=True, exist_ok=True)
    init_db(settings.database_url)
    ensure_broker_folders(settings)


def _uvicorn(host: str, port: int) -> None:
    import uvicorn

    from hawada.settings import get_settings

    # The app's default enqueuer sends `hawada.run_job` through the broker (hawada.store.broker).
    uvicorn.run(
        API_FACTORY,
        factory=True,
        host=host,
        port=port,
        log_level="info",
        access_log=get_settings().access_log,
    )


def serve(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Embedded service: migrate the database, start a Celery worker and the API."""
    _require("service", "engine", what="hawada serve")
    _init_db()
    supervisor = WorkerSupervisor()
    supervisor.start()
    console.print(
        f"HawAda serving on [bold]http://{host}:{port}[/bold] "
        "(a supervised Celery worker: restarted if it dies); Ctrl-C stops both"
    )
    try:
        _uvicorn(host, port)
    finally:
        supervisor.stop()


def api(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Run the API only (migrates the database first)."""
    _require("service", what="hawada api")
    _init_db()
    _uvicorn(host, port)


def worker(
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker in the foreground (replaces this process)."""
    _require("service", "engine", what="hawada worker")
    cmd = worker_command(loglevel)
    os.execv(cmd[0], cmd)


# -- one job in-process -------------------------------------------------------------------
def run(
    recipe: Annotated[Path, typer.Option(help="Recipe YAML/JSON file.")],
    weights: Annotated[Path, typer.Option(help="Weights (.safetensors/.pt).")],
    out: Annotated[Path, typer.Option(help="Output folder for the artifacts.")],
    dataset: Annotated[Path | None, typer.Option(help="Dataset file (npz).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    heldout: Annotated[
        Path | None, typer.Option(help="Held-out set (npz) instead of a seeded split.")
    ] = None,
    teacher_cache: Annotated[
        Path | None,
        typer.Option(
            help="Folder where the teacher's logits persist across runs on the same weights and "
            "data (e.g. several methods on one model); default: each run computes its own."
        ),
    ] = None,
) -> None:
    """Run one compression job in this process and write the same artifacts as the service."""
    _require("engine", what="hawada run")
    for path in (recipe, weights, dataset, heldout):
        if path is not None and not path.is_file():
            console.print(f"[red]error[/red] file not found: {escape(str(path))}", soft_wrap=True)
            raise typer.Exit(2)
    from hawada.core.errors import HawadaError
    from hawada.core.recipe import RecipeError, parse_recipe
    from hawada.worker.pipeline import run_local

    try:
        parsed = parse_recipe(recipe.read_text())
    except RecipeError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    with ProgressView(console) as view:
        try:
            report = run_local(
                parsed,
                weights,
                out,
                dataset=dataset,
                device=device,
                on_event=view.on_event,
                heldout=heldout,
                teacher_dir=teacher_cache,
            )
        except HawadaError as exc:
            console.print(f"[red]failed[/red] {exc.code}: {escape(exc.message)}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # the same command again resumes from out/.checkpoint
            console.print("interrupted; run the same command again to resume")
            raise typer.Exit(130) from None
    console.print(before_after_table(report))
    for warning in report_warnings(report):
        console.print(f"[yellow]warning[/yellow] {escape(warning)}", highlight=False)
    console.print(f"artifacts in [bold]{out}[/bold]")


# -- keys (store side) --------------------------------------------------------------------
def _session() -> Any:
    from hawada.settings import get_settings
    from hawada.store.db import session_scope

    return session_scope(get_settings().database_url)


@keys_app.command("create", epilog=f"Example: {EXAMPLES['keys create']}")
def keys_create(
    owner: Annotated[str, typer.Option(help="Owner the key acts as.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
) -> None:
    """Create an API key; the secret is printed once and stored only hashed."""
    _require("service", what="hawada keys")
    from hawada.store import keys

    _init_db()
    with _session() as session:
        secret = keys.create_key(session, owner=owner, name=name)
    console.print(f"key for owner {owner!r} (shown once, store it now):")
    print(secret)


@keys_app.command("list", epilog=f"Example: {EXAMPLES['keys list']}")
def keys_list(owner: Annotated[str | None, typer.Option()] = None) -> None:
    """List API keys (never their secrets)."""
    _require("service", what="hawada keys")
    from rich.table import Table

    from hawada.store import keys

    _init_db()
    table = Table(box=None)
    table.add_column("id", no_wrap=True, min_width=32)
    for column in ("owner", "name", "prefix", "created", "revoked"):
        table.add_column(column)

    def when(t: Any) -> str:
        return t.strftime("%Y-%m-%d %H:%M") if t else ""

    with _session() as session:
        for k in keys.list_keys(session, owner=owner):
            table.add_row(k.id, k.owner, k.name, k.prefix, when(k.created_at), when(k.revoked_at))
    console.print(table)


@keys_app.command("revoke", epilog=f"Example: {EXAMPLES['keys revoke']}")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key (by id or displayed prefix)."""
    _require("service", what="hawada keys")
    from hawada.store import keys

    _init_db()
    with _session() as session:
        revoked = keys.revoke_key(session, key_id)
    if not revoked:
        console.print(f"[red]error[/red] no live key {escape(key_id)}")
        raise typer.Exit(2)  # a usage error, like every bad argument (docs/cli.md)
    console.print(f"revoked {key_id}")


def worker_alive() -> None:
    """Exit 0 when a worker on this host beat its heartbeat recently (container health check)."""
    _require("service", what="hawada worker-alive")
    import socket

    from hawada.settings import get_settings
    from hawada.store.db import session_scope
    from hawada.store.heartbeats import live_workers

    settings = get_settings()
    try:
        with session_scope(settings.database_url) as session:
            alive = live_workers(session, 3 * settings.heartbeat_s, host=socket.gethostname())
    except Exception as exc:
        console.print(f"[red]error[/red] database: {type(exc).__name__}")
        raise typer.Exit(1) from None
    if not alive:
        console.print("no live worker on this host")
        raise typer.Exit(1)
    console.print(f"{alive} live worker(s) on this host")


def register(app: typer.Typer) -> None:
    """Add the service commands to `app`."""
    for name, fn in (
        ("serve", serve),
        ("api", api),
        ("worker", worker),
        ("run", run),
        ("worker-alive", worker_alive),
    ):
        app.command(name=name, epilog=f"Example: {EXAMPLES[name]}")(fn)
    app.add_typer(keys_app, name="keys", epilog=f"Example: {EXAMPLES['keys']}")


__all__ = ["API_FACTORY", "register", "start_worker", "stop_worker", "worker_command"]
