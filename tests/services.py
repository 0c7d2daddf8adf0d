"""A running HawAda service for end-to-end tests: `hawada serve` (embedded) or `hawada api` +
`hawada worker` as subprocesses of this interpreter, with their logs kept for failure messages.
Used by test_integration.py, test_packaging.py and test_supervision.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hawada.client.client import HawadaClient

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """The process ids of `pid`'s children, from Linux /proc (empty once it has exited)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


#: A job that runs in seconds: ResNet-18 at 16x16 on 128 digits, 6 gate steps, no fine-tune.
TINY = {
    "model": {
        "arch": "resnet18",
        "num_classes": 10,
        "stem": "cifar",
        "input_size": [3, 16, 16],
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    },
    "data": {"source": "digits", "batch_size": 16, "val_fraction": 0.25, "seed": 0, "limit": 128},
    "target": {"metric": "flops", "ratio": 0.5},
    "train": {"steps": 6, "log_every": 2},
    "finetune": {"epochs": 0},
    "latency": {"batch_size": 2, "repeats": 2, "warmup": 1},
}


def tiny_recipe(**overrides: dict[str, Any]) -> dict[str, Any]:
    """TINY with some sections updated (e.g. `train={"steps": 40}`)."""
    recipe = json.loads(json.dumps(TINY))
    for section, values in overrides.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


class Service:
    """API + worker subprocesses sharing one environment; logs kept for failure messages."""

    def __init__(self, env: dict[str, str], var_dir: Path, embedded: bool) -> None:
        self.var_dir = var_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        cli = [sys.executable, "-m", "hawada.cli"]
        addr = ["--host", "127.0.0.1", "--port", str(self.port)]
        commands = (
            [[*cli, "serve", *addr]]
            if embedded
            else [[*cli, "api", *addr], [*cli, "worker", "--loglevel", "INFO"]]
        )
        for i, cmd in enumerate(commands):
            log = var_dir / f"proc{i}.log"
            self.logs.append(log)
            with open(log, "ab") as out:  # the child keeps its own copy of the handle
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        self.client = HawadaClient(self.url)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"service exited early:\n{self.tail()}")
            if self.client.ready():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"service not ready:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        """The end of every process log (shown when an assertion fails)."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in self.logs
            if p.exists()
        )

    def stop(self) -> None:
        """Ctrl-C every process group; kill what does not exit in time."""
        self.client.close()
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def base_env(var_dir: Path) -> dict[str, str]:
    """This environment without HAWADA_* settings, pointed at `var_dir`, CPU, short leases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAWADA_")}
    env.update(
        HAWADA_VAR_DIR=str(var_dir),
        HAWADA_DEVICE="cpu",
        HAWADA_LEASE_S="6",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env
