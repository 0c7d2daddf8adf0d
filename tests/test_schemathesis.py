"""Property-based API testing against the live app: schemathesis generates requests from
/openapi.json (valid and invalid ones), sends them to `hawada api` on loopback and runs all of
its checks: no 5xx, responses that match the documented schema, status codes and content
types, documented headers. A bounded example count per operation keeps it to about a minute.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from services import ROOT, base_env, free_port

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

MAX_EXAMPLES = 25  # per operation
# "Schema-valid data is accepted" (positive_data_acceptance) cannot hold where validity is beyond
# what a schema can say, and the API must refuse: uploads carry random bytes as `weights` (the
# schema says "binary", not "a real model": 400 bad_weights), and a list `cursor` is an opaque
# token only the server issues (400 invalid_cursor; tests/test_api.py pages with real ones).
# Every other check stays on for these operations, and that one for every other operation.
POSITIVE_EXEMPT = {("POST", "/v1/jobs"), ("POST", "/v1/models"), ("GET", "/v1/jobs")}


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    env = base_env(tmp / "var")
    env.update(
        HAWADA_MAX_UPLOAD_BYTES=str(4 * 1024 * 1024),
        HAWADA_DATA_ROOTS=f'["{tmp / "data"}"]',
        HAWADA_MAX_ACTIVE_JOBS_PER_OWNER="1000",
        HAWADA_HEARTBEAT_S="3600",
    )
    port = free_port()
    log = tmp / "api.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hawada.cli", "api", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    # Stand in for a live worker (one heartbeat row), so /readyz is honestly ready: a 503 there
    # is tested in tests/test_supervision.py.
    from hawada.store import heartbeats
    from hawada.store.db import session_scope

    with session_scope(f"sqlite:///{tmp / 'var' / 'hawada.db'}") as session:
        heartbeats.beat(session, "stand-in:1")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        text = log.read_text(errors="replace")
        assert "unhandled error" not in text, text[-4000:]
        assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def api_schema(live_api: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_api}/openapi.json")


def _run_operation(operation: Any) -> None:
    """Hypothesis drives one operation: generated cases, each sent and validated."""

    excluded: list[Any] = []
    if (operation.method.upper(), operation.path) in POSITIVE_EXEMPT:
        from schemathesis.checks import positive_data_acceptance

        excluded = [positive_data_acceptance]

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    @hypothesis.given(case=operation.as_strategy())
    def run(case: Any) -> None:
        case.call_and_validate(timeout=30, excluded_checks=excluded)

    run()


def test_api_conforms_to_its_openapi(api_schema: Any) -> None:
    """Every operation, all checks on: no 5xx, documented status codes, content types, bodies."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    failures = []
    for operation in operations:
        try:
            _run_operation(operation)
        except Exception as exc:  # collect every operation's finding, then fail once
            failures.append(f"{operation.label}: {str(exc)[:2000]}")
    assert not failures, "\n\n".join(failures)
