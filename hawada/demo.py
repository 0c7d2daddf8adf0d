"""`make demo` (`python -m hawada.demo`): the main job end to end over HTTP on this machine.

Starts `hawada serve` (API + Celery worker, SQLite + filesystem broker under ./var/demo),
trains a small baseline on offline data, submits the compression job over HTTP, follows its
progress, downloads and checks every artifact, loads the pruned model as a plain torchvision
model and prints the before/after table. The service is stopped on the way out.
"""

from __future__ import annotations

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

from hawada.client.cli import watch_job
from hawada.client.client import HawadaClient
from hawada.console import before_after_table, console

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


def stop_service(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Ctrl-C the service (it stops its worker) and wait; kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
    """Run the demo; returns a process exit code."""
    var_dir = ROOT / "var" / "demo"
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
            job = watch_job(client, job["id"], poll_s=0.5)
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
    finally:
        console.print("stopping the service")
        stop_service(proc)
    console.print(
        f"demo finished in {time.monotonic() - started:.0f} s; artifacts in {var_dir / 'result'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
