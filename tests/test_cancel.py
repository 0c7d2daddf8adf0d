"""Cancel within seconds in every phase, including code that never polls the cancel flag."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from services import ROOT, Service, base_env, tiny_recipe

# Runs `runner.execute` in the main thread of a fresh interpreter, as the Celery pool child
# does, with a pipeline stuck in a loop that never looks at the cancel flag.
SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
from hawada.settings import Settings
from hawada.store import jobs
from hawada.store.db import init_db, session_scope
from hawada.worker import runner

var = Path(sys.argv[1])
s = Settings(var_dir=var, lease_s=3)
init_db(s.database_url)
with session_scope(s.database_url) as session:
    job_id = jobs.create_job(session, owner="a", recipe={}, recipe_hash="h", weights_path="w").id
started = threading.Event()

def stuck(settings, spec, work, checkpoint_dir, sink, cancel):
    started.set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # e.g. a latency loop: busy, never polls `cancel`
        sum(i * i for i in range(10000))
    return {}

runner._run_pipeline = stuck
asked = []

def cancel_later():
    started.wait(30)
    time.sleep(0.5)
    asked.append(time.monotonic())
    with session_scope(s.database_url) as session:
        jobs.request_cancel(session, "a", job_id)

threading.Thread(target=cancel_later, daemon=True).start()
status = runner.execute(job_id, s)
took = time.monotonic() - asked[0]
with session_scope(s.database_url) as session:
    final = jobs.load_job(session, job_id).status
print(json.dumps({"status": status, "final": final, "took": took}))
"""


def test_cancel_interrupts_a_phase_that_never_polls(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "var")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "cancelled" and result["final"] == "cancelled"
    assert result["took"] < 5.0, result


def test_canceller_does_nothing_off_the_main_thread() -> None:
    """Tests and threads calling execute() are never signalled (only the main thread is)."""
    import threading

    from hawada.worker.runner import MainThreadCanceller

    seen: list[bool] = []

    def body() -> None:
        flag = threading.Event()
        flag.set()
        with MainThreadCanceller(flag, grace_s=0.01) as canceller:
            seen.append(canceller.usable)
            time.sleep(0.2)

    t = threading.Thread(target=body)
    t.start()
    t.join(5)
    assert seen == [False]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "overrides"),
    [
        # Profiling a recipe whose latency block alone would take hours.
        ("profiling", {"latency": {"batch_size": 512, "repeats": 100000, "warmup": 1}}),
        # Evaluating the baseline on a large held-out split (no step loop to poll in).
        ("baseline", {"data": {"limit": 1797, "val_fraction": 0.9, "batch_size": 512}}),
    ],
)
def test_cancel_in_a_heavy_phase_ends_within_seconds(
    tmp_path: Path, phase: str, overrides: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model

    weights = tmp_path / "w.safetensors"
    save_file(build_model("resnet18", num_classes=10, stem="cifar").state_dict(), str(weights))
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    env = base_env(var_dir)
    env["HAWADA_MAX_LATENCY_IMAGES"] = str(10**9)  # an operator who allows it: cancel still works
    svc = Service(env, var_dir, embedded=True)
    try:
        job_id = svc.client.submit(tiny_recipe(**overrides), weights)["id"]
        deadline = time.monotonic() + 240
        while svc.client.get(job_id)["phase"] != phase:
            assert time.monotonic() < deadline, svc.tail()
            assert svc.client.get(job_id)["status"] in ("queued", "running"), svc.tail()
            time.sleep(0.2)
        time.sleep(1.0)
        asked = time.monotonic()
        svc.client.cancel(job_id)
        while svc.client.get(job_id)["status"] not in ("cancelled", "failed", "succeeded"):
            assert time.monotonic() - asked < 30, svc.tail()
            time.sleep(0.1)
        took = time.monotonic() - asked
        job = svc.client.get(job_id)
        assert job["status"] == "cancelled", job
        assert took < 5.0, (phase, took)
    finally:
        svc.stop()
