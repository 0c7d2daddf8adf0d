"""API benchmark: status-polling throughput/latency and a submission burst, loopback only.

Starts the embedded API (`hawada api`, SQLite + filesystem broker in a temporary var dir) in a
subprocess; no worker runs, so submitted jobs stay queued with their message in the broker.

    .venv/bin/python bench/api.py [--clients 50 200] [--seconds 10] [--burst 1000] [--record]

Measures, for each client count, how many `GET /v1/jobs/{id}` a second the API answers and
their p50/p99 latency; then fires `--burst` submissions at once and checks none was lost:
ids returned == job rows in the database == messages in the broker queue. `--record` writes
the table with the machine description into the "API" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RECIPE = (ROOT / "recipes" / "demo-digits.yaml").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tiny_safetensors() -> bytes:
    """A valid one-tensor safetensors file built by hand (the API never imports torch)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"\x00" * 16


def machine() -> str:
    """CPU model, core count, OS and Python of this machine."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def poll(
    url: str, job_id: str, clients: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """`clients` concurrent loops of GET /v1/jobs/{id} for `seconds` (or `max_requests`)."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as http:
        deadline = time.perf_counter() + seconds

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) < max_requests:
                t0 = time.perf_counter()
                try:
                    resp = await http.get(f"/v1/jobs/{job_id}")
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
    }


async def burst(url: str, model_id: str, count: int, concurrency: int) -> dict[str, Any]:
    """`count` JSON submissions launched together (at most `concurrency` in flight)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ids: list[str] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as http:

        async def submit(i: int) -> None:
            resp = await http.post(
                "/v1/jobs",
                json={"recipe": RECIPE, "model_id": model_id},
                headers={"Idempotency-Key": f"burst-{i}"},
            )
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if resp.status_code == 202:
                ids.append(resp.json()["id"])

        start = time.perf_counter()
        await asyncio.gather(*(submit(i) for i in range(count)))
        elapsed = time.perf_counter() - start
    return {
        "count": count,
        "seconds": elapsed,
        "rate": count / elapsed,
        "ids": ids,
        "statuses": statuses,
    }


def count_rows(database_url: str) -> int:
    """Job rows in the database."""
    from sqlalchemy import func, select

    from hawada.store.db import session_scope
    from hawada.store.models import Job

    with session_scope(database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)))


def start_api(var_dir: Path, port: int) -> subprocess.Popen:
    """`hawada api` on loopback with state under var_dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAWADA_")}
    env["HAWADA_VAR_DIR"] = str(var_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "hawada.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(var_dir / "api.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll /readyz until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the API exited; see api.log")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("API not ready")


def render(polls: list[dict[str, Any]], sub: dict[str, Any], rows: int, queued: int) -> str:
    """Markdown tables of the results."""
    lines = [
        "| clients | requests | errors | req/s | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p['clients']} | {p['requests']} | {p['errors']} | {p['rps']:.0f} | "
        f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} |"
        for p in polls
    ]
    lost = sub["count"] - len(set(sub["ids"]))
    lines += [
        "",
        "| submissions | seconds | per second | 202 answers | unique ids | job rows "
        "| broker messages | lost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {sub['count']} | {sub['seconds']:.1f} | {sub['rate']:.0f} | "
        f"{sub['statuses'].get(202, 0)} | {len(set(sub['ids']))} | {rows} | {queued} "
        f"| {lost} |",
    ]
    return "\n".join(lines)


def record(text: str) -> None:
    """Replace (or append) the "## API" section of bench/RESULTS.md, leaving others alone."""
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find("\n## API")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + 1)
        new = old[:start] + "\n" + text.rstrip("\n") + ("\n" + old[nxt:] if nxt >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


def main() -> int:
    """Run the benchmark and print (and optionally record) its tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--burst-concurrency", type=int, default=100)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hawada-bench-") as tmp:
        var_dir = Path(tmp)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_api(var_dir, port)
        try:
            wait_ready(url, proc)
            model = httpx.post(
                f"{url}/v1/models",
                timeout=30,
                files={"weights": ("w.safetensors", io.BytesIO(_tiny_safetensors()))},
            )
            model.raise_for_status()
            model_id = model.json()["id"]
            job = httpx.post(
                f"{url}/v1/jobs", json={"recipe": RECIPE, "model_id": model_id}, timeout=30
            )
            job.raise_for_status()
            polls = [
                asyncio.run(poll(url, job.json()["id"], n, args.seconds, args.max_requests))
                for n in args.clients
            ]
            sub = asyncio.run(burst(url, model_id, args.burst, args.burst_concurrency))
            rows = count_rows(f"sqlite:///{var_dir / 'hawada.db'}") - 1  # minus the poll target
            queued = sum(1 for _ in (var_dir / "broker" / "queue").glob("*.msg")) - 1
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    table = render(polls, sub, rows, queued)
    print(table)
    if args.record:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        record(
            f"## API\n\n`bench/api.py` (embedded API: SQLite + filesystem broker, one uvicorn "
            f"process, loopback, no worker), {when}.\nMachine: {machine()}; shared with other "
            f"work while measured, so treat the numbers as a lower bound.\n"
            f"Polling: each client loops `GET /v1/jobs/{{id}}` for {args.seconds:.0f} s. "
            f"Burst: {args.burst} JSON submissions (`model_id`), {args.burst_concurrency} in "
            f"flight.\n\n{table}\n"
        )
    lost = args.burst - len(set(sub["ids"]))
    return 0 if lost == 0 and rows == args.burst and queued == args.burst else 1


if __name__ == "__main__":
    sys.exit(main())
