"""API benchmark: status-polling throughput/latency against a naive anchor, and a burst.

Starts the embedded API (`hawada api`, SQLite + filesystem broker in a temporary var dir) in a
subprocess; no worker runs, so submitted jobs stay queued with their message in the broker.
In the same run it starts the naive anchor (`bench/naive_app.py`: FastAPI + sync SQLAlchemy on
the same SQLite file, one route, one uvicorn process) and measures both with `wrk` (Debian
package `wrk`) at the same connection counts, one after the other, and prints the ratio.

    .venv/bin/python bench/api.py [--connections 50] [--seconds 10] [--burst 1000] [--record]
    .venv/bin/python bench/api.py --quick      # a smoke run: 2 s, 10 connections, 50 submissions

Then it fires `--burst` submissions at once and checks none was lost: ids returned == job rows
in the database == messages in the broker queue. `--record` writes the tables with the machine
description and load average into the "API" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import platform
import shutil
import signal
import socket
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


def _fitting_safetensors() -> bytes:
    """Zero-valued weights with the names and shapes the recipe's model needs (torch-free)."""
    from hawada.core.architectures import expected_state_dict, placeholder_safetensors
    from hawada.core.recipe import parse_recipe

    model = parse_recipe(RECIPE).model
    shapes = expected_state_dict(model.arch, model.num_classes, model.stem) or {}
    return placeholder_safetensors(shapes)


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


async def burst(url: str, model_id: str, count: int, concurrency: int) -> dict[str, Any]:
    """`count` JSON submissions launched together (at most `concurrency` in flight)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ids: list[str] = []
    resent: list[int] = []
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as http:

        async def submit(i: int) -> None:
            # A connection dropped before the answer (seen in bursts of 1000) leaves the client
            # not knowing whether the job exists: it resends with the same Idempotency-Key, as
            # HawadaClient does, and the service must neither lose nor duplicate the job.
            for attempt in range(4):
                try:
                    resp = await http.post(
                        "/v1/jobs",
                        json={"recipe": RECIPE, "model_id": model_id},
                        headers={"Idempotency-Key": f"burst-{i}"},
                    )
                    break
                except httpx.TransportError:
                    if attempt == 3:
                        raise
                    resent.append(i)
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
        "resent": len(resent),
    }


class OpenStreams:
    """`count` SSE streams on a job's events, held open from a background thread until close()."""

    def __init__(self, url: str, job_id: str, count: int) -> None:
        import threading

        self.url, self.job_id, self.count = url, job_id, count
        self.statuses: dict[int, int] = {}
        self._opened = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _one(self, http: httpx.AsyncClient, ready: list[int]) -> None:
        headers = {"Accept": "text/event-stream"}
        async with http.stream("GET", f"/v1/jobs/{self.job_id}/events", headers=headers) as r:
            self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            ready.append(1)
            if len(ready) == self.count:
                self._opened.set()
            assert self._stop is not None
            if r.status_code == 200:
                await self._stop.wait()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        limits = httpx.Limits(max_connections=self.count + 10)
        ready: list[int] = []
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=None) as http:
            await asyncio.gather(*(self._one(http, ready) for _ in range(self.count)))

    def open(self, timeout: float = 120.0) -> None:
        self._thread.start()
        if not self._opened.wait(timeout):
            raise TimeoutError(f"only {sum(self.statuses.values())} of {self.count} streams opened")

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    for unit in ("us", "ms", "s"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    raise ValueError(f"no unit in {text!r}")


def run_wrk(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """`wrk --latency` on one URL: requests/s, p50/p99 in ms, non-2xx and socket errors."""
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, Any] = {"connections": connections, "errors": 0}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            result["p50_ms" if parts[0] == "50%" else "p99_ms"] = _ms(parts[1])
        elif line.strip().startswith("Non-2xx"):
            result["errors"] += int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            result["errors"] += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
        elif "requests in" in line:
            result["requests"] = int(parts[0])
    return result


def start_naive(db: Path, port: int, log: Path) -> subprocess.Popen:
    """The anchor app (bench/naive_app.py) on loopback, reading HawAda's database file."""
    env = {**os.environ, "HAWADA_BENCH_DB": str(db)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "naive_app:create_app",
            "--app-dir",
            str(ROOT / "bench"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def render_side_by_side(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """HawAda and the anchor, per connection count, with the throughput and p99 ratios."""
    lines = [
        "| app | connections | requests | errors | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['connections']} | {r.get('requests', 0)} | {r['errors']} | "
            f"{r.get('rps', 0):.0f} | {r.get('p50_ms', float('nan')):.1f} | "
            f"{r.get('p99_ms', float('nan')):.1f} |"
        )
    by_conn: dict[int, dict[str, dict[str, Any]]] = {}
    for name, r in rows:
        by_conn.setdefault(r["connections"], {})[name] = r
    for conn, pair in sorted(by_conn.items()):
        if {"hawada", "naive"} <= set(pair) and pair["naive"].get("rps"):
            h, n = pair["hawada"], pair["naive"]
            ratio = h.get("rps", 0) / n["rps"]
            h99, n99 = h.get("p99_ms", float("nan")), n.get("p99_ms", float("nan"))
            lines.append(
                f"\nAt {conn} connections HawAda serves {ratio:.2f}x the naive app's requests/s "
                f"(goal >= 1.5x); p99 {h99:.0f} ms (goal at 50 connections: < 50 ms) "
                f"vs {n99:.0f} ms."
            )
    return "\n".join(lines)


def render_streams(r: dict[str, Any], count: int) -> str:
    """Polling while `count` SSE streams are open (goal: p99 < 100 ms)."""
    opened = r["streams"].get(200, 0)
    return "\n".join(
        [
            "| open SSE streams | connections | requests | errors | req/s | p50 ms | p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {opened} of {count} | {r['connections']} | {r.get('requests', 0)} | "
            f"{r['errors']} | {r.get('rps', 0):.0f} | {r.get('p50_ms', float('nan')):.1f} | "
            f"{r.get('p99_ms', float('nan')):.1f} |",
            "",
            f"With {opened} event streams open, polling p99 is "
            f"{r.get('p99_ms', float('nan')):.0f} ms (goal < 100 ms).",
        ]
    )


def count_rows(database_url: str) -> int:
    """Job rows in the database."""
    from sqlalchemy import func, select

    from hawada.store.db import session_scope
    from hawada.store.models import Job

    with session_scope(database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def start_api(var_dir: Path, port: int, streams: int = 0) -> subprocess.Popen:
    """`hawada api` on loopback with state under var_dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAWADA_")}
    env["HAWADA_VAR_DIR"] = str(var_dir)
    env["HAWADA_MAX_ACTIVE_JOBS_PER_OWNER"] = "1000000"  # the burst queues every job
    if streams:  # the stream phase opens `streams` streams as one owner: raise both caps to it
        env["HAWADA_MAX_EVENT_STREAMS"] = env["HAWADA_MAX_EVENT_STREAMS_PER_OWNER"] = str(streams)
    return subprocess.Popen(
        [sys.executable, "-m", "hawada.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(var_dir / "api.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(
    url: str, proc: subprocess.Popen, timeout: float = 60.0, path: str = "/healthz"
) -> None:
    """Poll /healthz until it answers 200 (/readyz would wait for a worker; none runs here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the API exited; see api.log")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("API not ready")


def render_burst(sub: dict[str, Any], rows: int, queued: int) -> str:
    """Markdown table of the submission burst."""
    lost = sub["count"] - len(set(sub["ids"]))
    return "\n".join(
        [
            "| submissions | seconds | per second | resent after a dropped connection "
            "| 202 answers | unique ids | job rows | broker messages | lost |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {sub['count']} | {sub['seconds']:.1f} | {sub['rate']:.0f} | {sub['resent']} | "
            f"{sub['statuses'].get(202, 0)} | {len(set(sub['ids']))} | {rows} | {queued} "
            f"| {lost} |",
        ]
    )


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
    parser.add_argument("--connections", type=int, nargs="+", default=[50])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--burst-concurrency", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s, 10 conns, burst 50")
    parser.add_argument(
        "--streams",
        type=int,
        default=300,
        help="then hold this many SSE streams open and poll again at the first connection count "
        "(0: skip)",
    )
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.connections, args.seconds, args.burst, args.burst_concurrency = [10], 2.0, 50, 10
        args.streams = min(args.streams, 20)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="hawada-bench-") as tmp:
        var_dir = Path(tmp)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_api(var_dir, port, args.streams)
        try:
            wait_ready(url, proc)
            model = httpx.post(
                f"{url}/v1/models",
                timeout=30,
                files={"weights": ("w.safetensors", io.BytesIO(_fitting_safetensors()))},
            )
            model.raise_for_status()
            model_id = model.json()["id"]
            job = httpx.post(
                f"{url}/v1/jobs", json={"recipe": RECIPE, "model_id": model_id}, timeout=30
            )
            job.raise_for_status()
            job_url = f"{url}/v1/jobs/{job.json()['id']}"
            naive_port = _free_port()
            naive = start_naive(var_dir / "hawada.db", naive_port, var_dir / "naive.log")
            try:
                wait_ready(
                    f"http://127.0.0.1:{naive_port}", naive, path=f"/jobs/{job.json()['id']}"
                )
                rows: list[tuple[str, dict[str, Any]]] = []
                for conns in args.connections:  # measured in the same run, one after the other
                    rows.append(("hawada", run_wrk(job_url, conns, args.seconds)))
                    naive_url = f"http://127.0.0.1:{naive_port}/jobs/{job.json()['id']}"
                    rows.append(("naive", run_wrk(naive_url, conns, args.seconds)))
            finally:
                naive.send_signal(signal.SIGINT)
                naive.wait(15)
            streamed: dict[str, Any] | None = None
            if args.streams:  # polling while that many event streams stay open
                streams = OpenStreams(url, job.json()["id"], args.streams)
                try:
                    streams.open()
                    # Measure the steady state: each new stream first reads its job's events
                    # once (300 reads through the streams' 4 threads take about a second).
                    time.sleep(3.0)
                    streamed = run_wrk(job_url, args.connections[0], args.seconds)
                    streamed["streams"] = dict(streams.statuses)
                finally:
                    streams.close()
            sub = asyncio.run(burst(url, model_id, args.burst, args.burst_concurrency))
            job_rows = count_rows(f"sqlite:///{var_dir / 'hawada.db'}") - 1  # minus the target
            queued = sum(1 for _ in (var_dir / "broker" / "queue").glob("*.msg")) - 1
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    table = render_side_by_side(rows)
    if streamed is not None:
        table += "\n\n" + render_streams(streamed, args.streams)
    table += "\n\n" + render_burst(sub, job_rows, queued)
    print(table)
    if args.record:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        record(
            f"## API\n\n`bench/api.py` (embedded API: SQLite + filesystem broker, one uvicorn "
            f"process, loopback, no worker; the naive anchor app on the same database), {when}."
            f"\nMachine: {machine()}; load average before the run: {load}.\n"
            f"Polling: `wrk -t2 -c N --latency` on `GET /v1/jobs/{{id}}` for "
            f"{args.seconds:.0f} s per app. "
            f"Burst: {args.burst} JSON submissions (`model_id`), {args.burst_concurrency} in "
            f"flight.\n\n{table}\n"
        )
    lost = args.burst - len(set(sub["ids"]))
    return 0 if lost == 0 and job_rows == args.burst and queued == args.burst else 1


if __name__ == "__main__":
    sys.exit(main())
