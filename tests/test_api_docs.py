"""The reference docs stay in step with the code. docs/api.md: every route of /openapi.json is in
its endpoint table and nothing else is, with the same success statuses and every parameter
named; every error code the API can answer is in its error table with its status.
docs/cli.md: a section per command, with an example and its exit codes."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
_ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^`?]*)(?:\?[^`]*)?` \| ([^|]*) \|", re.M)
_ERROR_ROW = re.compile(r"^\| (\d{3}) \| `([a-z_]+)` \|", re.M)
# Framework pages, not part of the API
_UNDOCUMENTED = {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


def _norm(path: str) -> str:
    """`/v1/jobs/{id}` and `/v1/jobs/{job_id}` are the same route."""
    return re.sub(r"\{[^}]+\}", "{}", path)


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from hawada.api.main import create_app
    from hawada.settings import Settings

    var = tmp_path_factory.mktemp("var")
    settings = Settings(var_dir=var, database_url=f"sqlite:///{var / 'hawada.db'}")
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        res = client.get("/openapi.json")
    assert res.status_code == 200
    return dict(res.json())


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), _norm(path)): op
        for path, ops in spec["paths"].items()
        if path not in _UNDOCUMENTED
        for method, op in ops.items()
    }


def _documented() -> dict[tuple[str, str], set[int]]:
    """(method, path) -> the statuses named in the 'success' column of the endpoint table."""
    return {
        (m, _norm(p)): {int(s) for s in re.findall(r"\b[1-5]\d\d\b", success)}
        for m, p, success in _ROW.findall(DOC)
    }


def test_every_route_is_documented_and_every_documented_route_exists(openapi) -> None:
    served, documented = set(_operations(openapi)), set(_documented())
    assert served - documented == set(), "routes missing from docs/api.md"
    assert documented - served == set(), "docs/api.md lists routes the API does not serve"


def test_success_statuses_match(openapi) -> None:
    documented = _documented()
    for key, op in _operations(openapi).items():
        # the shared error answers are documented once, in the error table
        statuses = {int(s) for s in op.get("responses", {}) if s.isdigit()}
        success = {s for s in statuses if s < 400 or s == 503}
        assert documented[key] == success, f"{key}: docs say {documented[key]}, API {success}"


def test_every_parameter_is_named(openapi) -> None:
    text = DOC.lower()
    for key, op in _operations(openapi).items():
        for param in op.get("parameters", []):
            if param["in"] in ("query", "header"):
                assert param["name"].lower() in text, f"{key}: parameter {param['name']!r}"


def _error_codes() -> set[tuple[int, str]]:
    """(status, code) of every error the API's source can answer with."""
    found: set[tuple[int, str]] = set()
    for path in (ROOT / "api").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None))
                in ("ApiError", "error_response")
                and len(node.args) >= 2
                and all(isinstance(a, ast.Constant) for a in node.args[:2])
            ):
                status, code = node.args[0].value, node.args[1].value
                if isinstance(status, int) and isinstance(code, str):
                    found.add((status, code))
            if isinstance(node, ast.Dict) and all(
                isinstance(k, ast.Constant) and isinstance(k.value, int) for k in node.keys
            ):  # the framework's status -> code table
                for k, v in zip(node.keys, node.values, strict=True):
                    assert isinstance(k, ast.Constant)
                    if isinstance(v, ast.Constant) and isinstance(v.value, str):
                        found.add((int(k.value), v.value))
    return found


def test_every_error_code_is_in_the_error_table() -> None:
    table = {(int(s), c) for s, c in _ERROR_ROW.findall(DOC)}
    codes = _error_codes()
    assert len(codes) > 10  # the scan found the API's errors
    assert codes - table == set(), "error codes missing from docs/api.md's error table"


def test_documented_commands_exist() -> None:
    """Every `hawada <command>` the page shows is a command of the CLI."""
    from hawada.cli import app

    names = {c.name for c in app.registered_commands} | {
        g.name for g in app.registered_groups if g.name
    }
    for command in re.findall(r"`hawada ([a-z]+)", DOC):
        assert command in names, f"docs/api.md: hawada {command}"


def test_cli_md_documents_every_command() -> None:
    """docs/cli.md has a section per command (with an example and its exit codes)."""
    from hawada.cli import app

    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    headings = re.findall(r"^### (.+)$", doc, re.M)
    names = [c.name for c in app.registered_commands] + [
        g.name for g in app.registered_groups if g.name
    ]
    assert len(names) >= 14
    for name in names:
        (section,) = [h for h in headings if re.search(rf"`hawada {name}[` ]", h)]
        body = doc.split(f"### {section}", 1)[1].split("\n### ", 1)[0]
        assert "```bash" in body and f"hawada {name}" in body, f"no example for {name}"
        if name not in ("serve", "api", "worker"):  # long-running: stopped, not finished
            assert "Exit codes" in body, f"no exit codes for {name}"
