"""`make demo` (`python -m hawada.demo`): the main job end to end over HTTP on this machine.

Starts `hawada serve` (API + Celery worker, SQLite + filesystem broker under ./var/demo, or
`HAWADA_DEMO_DIR`), trains a small baseline on offline data, submits the compression job over
HTTP, follows its progress (a live bar on a terminal, timestamped lines in a log file),
downloads and checks every artifact, loads the pruned model as a plain torchvision model and
prints the before/after table. The service and its worker are stopped on the way out, also on
Ctrl-C (SIGINT) and SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.markup import escape

from hawada.client.cli import follow
from hawada.client.client import HawadaClient
from hawada.console import before_after_table, console, report_warnings

# The demo runs from a source checkout (`make demo`): recipes/ and var/ of the repository.
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(var_dir: Path, port: int) -> subprocess.Popen:
    """`hawada serve` in a subprocess, logging to var_dir/serve.log."""
    env = {
        **os.environ,
        "HAWADA_VAR_DIR": str(var_dir),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
    }
    for name in (
        "HAWADA_DATABASE_URL",
        "HAWADA_BROKER_URL",
        "HAWADA_ARTIFACTS_DIR",
        "HAWADA_LUT_DIR",
    ):
        env.pop(name, None)  # the demo is the embedded mode, whatever the shell has set
    log = open(var_dir / "serve.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "hawada.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux ``/proc``; empty elsewhere).

    `hawada serve` starts its worker in a session of its own and the worker forks its pool
    child, so neither a process group nor a session holds the whole service: the tree does.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent only has to reap it


def stop_service(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Ctrl-C the service (it stops its worker) and wait; then kill whatever of its process
    tree is still there (a worker busy training ignores a polite stop for a while)."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 15.0
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in tree:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM: unwind like Ctrl-C so the `finally` blocks stop the service."""
    raise KeyboardInterrupt(f"signal {signum}")


def wait_ready(client: HawadaClient, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll /readyz until the API, database and broker answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hawada serve exited with {proc.returncode}; see serve.log")
        if client.ready():
            return
        time.sleep(0.3)
    raise TimeoutError("the service did not become ready")


# Enough for ~95% held-out accuracy on digits while keeping the demo to a few minutes on 2 cores.
BASELINE_STEPS = int(os.environ.get("HAWADA_DEMO_BASELINE_STEPS", "150"))


def train_baseline(recipe: Path, out: Path, steps: int = BASELINE_STEPS) -> None:
    """Train the model to compress (`python -m hawada.worker.baseline`), in its own process."""
    cmd = [
        sys.executable,
        "-m",
        "hawada.worker.baseline",
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "--steps",
        str(steps),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)


def check_pruned(folder: Path, report: dict) -> str:
    """Load the downloaded pruned model the way a user would; return a one-line summary."""
    import torch

    from hawada.adapters.torchvision import load_pruned

    model = load_pruned(folder / "pruned.json", folder / "pruned.safetensors").eval()
    size = json.loads((folder / "pruned.json").read_text())["input_size"]
    with torch.no_grad():
        out = model(torch.randn(2, *size))
    params = sum(p.numel() for p in model.parameters())
    assert torch.isfinite(out).all(), "pruned model produced non-finite outputs"
    assert params == report["pruned"]["params"], (params, report["pruned"]["params"])
    return f"{type(model).__module__}.{type(model).__name__}, {params:,} parameters"


def main() -> int:
    """Run the demo; returns a process exit code (130 when interrupted)."""
    signal.signal(signal.SIGTERM, _terminate)
    var_dir = Path(os.environ.get("HAWADA_DEMO_DIR", ROOT / "var" / "demo")).resolve()
    recipe = ROOT / "recipes" / "demo-digits.yaml"
    shutil.rmtree(var_dir, ignore_errors=True)  # a clean, repeatable run
    var_dir.mkdir(parents=True)
    started = time.monotonic()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    console.rule("HawAda demo")
    console.print(f"starting [bold]hawada serve[/bold] on {url} (state in {var_dir})")
    proc = start_service(var_dir, port)
    try:
        with HawadaClient(url) as client:
            wait_ready(client, proc)
            console.print("service ready; training the baseline model (digits, ResNet-18)")
            weights = var_dir / "baseline.safetensors"
            train_baseline(recipe, weights)
            job = client.submit(recipe, weights)
            console.print(f"submitted job [bold]{job['id']}[/bold]")
            job = follow(client, job["id"], poll_s=0.5, out=console)
            if job["status"] != "succeeded":
                console.print(f"[red]job {job['status']}[/red]: {escape(str(job.get('error')))}")
                return 1
            result = var_dir / "result"
            paths = client.download_all(job["id"], result)
            console.print(
                "downloaded (sha256 verified): "
                + ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in paths)
            )
            report = json.loads((result / "report.json").read_text())
            console.print("loaded pruned model: " + check_pruned(result, report))
            console.print(before_after_table(report))
            for warning in report_warnings(report):
                console.print(f"[yellow]warning[/yellow] {escape(warning)}")
            console.print(f"report: {result / 'report.html'}")
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("stopping the service")
        stop_service(proc)
    console.print(
        f"demo finished in {time.monotonic() - started:.0f} s; artifacts in {var_dir / 'result'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
