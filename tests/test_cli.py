"""The `hawada` command against a real API over HTTP (uvicorn in a thread, SQLite in tmp, a fake
worker ending jobs as each test says; tests/apiserver.py), plus `hawada run` in-process.

Exit codes (docs/cli.md): 0 succeeded, 1 failed or cancelled, 2 usage/connection error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from apiserver import FAKE_STEPS, free_port, job_with, tiny_safetensors
from typer.testing import CliRunner

from hawada.cli import app
from hawada.client.client import HawadaClient

ROOT = Path(__file__).resolve().parents[1]
# Wide enough that rich never wraps a line the tests look for (a long temporary path would
# otherwise split "sha256 ok" over two lines at the default 80 columns).
runner = CliRunner(env={"COLUMNS": "240"})
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ", re.M)


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text((ROOT / "recipes" / "demo-digits.yaml").read_text())
    return path


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return tiny_safetensors(tmp_path / "w.safetensors")


def _invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_submit_status_list_cancel(api_server: Any, recipe_file: Path, weights: Path) -> None:
    url = api_server.url
    res = _invoke("submit", "--recipe", str(recipe_file), "--weights", str(weights), "--url", url)
    assert res.exit_code == 0, res.output
    job_id = res.stdout.strip()  # only the id on stdout: JOB=$(hawada submit ...)
    assert re.fullmatch(r"[0-9a-f]{32}", job_id) and api_server.enqueued == [job_id]

    res = _invoke("status", job_id, "--url", url, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "queued"
    res = _invoke("list", "--url", url)
    assert res.exit_code == 0 and job_id in res.stdout and "queued" in res.stdout
    res = _invoke("list", "--url", url, "--json")
    assert [j["id"] for j in json.loads(res.stdout)["items"]] == [job_id]
    res = _invoke("cancel", job_id, "--url", url)
    assert res.exit_code == 0 and "cancelled" in res.stdout
    with HawadaClient(url) as hc:
        assert hc.get(job_id)["status"] == "cancelled"
    assert _invoke("status", job_id, "--url", url).exit_code == 1  # cancelled: 1
    assert _invoke("delete", job_id, "--url", url).exit_code == 0
    assert _invoke("status", job_id, "--url", url).exit_code == 2  # gone: an API error


def test_api_errors_are_one_line_and_exit_code_2(api_server: Any, tmp_path: Path) -> None:
    res = _invoke("status", "0" * 32, "--url", api_server.url)
    assert res.exit_code == 2 and "job_not_found (404)" in res.stderr
    assert "Traceback" not in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: resnet18, num_classes: 10}\ntarget: {ratio: 7}\n")
    weights = tiny_safetensors(tmp_path / "w.safetensors")
    res = _invoke(
        "submit", "--recipe", str(bad), "--weights", str(weights), "--url", api_server.url
    )
    assert res.exit_code == 2 and "invalid_recipe (422)" in res.stderr
    assert "target.ratio" in res.stderr  # every invalid field is named
    assert api_server.enqueued == []


@pytest.mark.parametrize("missing", ["recipe", "weights", "dataset"])
def test_missing_file_is_named_and_nothing_is_sent(
    api_server: Any, recipe_file: Path, weights: Path, tmp_path: Path, missing: str
) -> None:
    paths = {"recipe": recipe_file, "weights": weights, "dataset": None}
    paths[missing] = tmp_path / f"no-such-{missing}.yaml"
    args = [f"--{k}={v}" for k, v in paths.items() if v is not None]
    res = _invoke("submit", *args, "--url", api_server.url)
    assert res.exit_code == 2
    assert f"file not found: {paths[missing]}" in res.stderr
    assert api_server.enqueued == []


@pytest.mark.parametrize(("outcome", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 1)])
def test_exit_codes_follow_the_job(
    api_settings: Any, api_server: Any, recipe_file: Path, weights: Path, outcome: str, code: int
) -> None:
    url = api_server.url
    api_server.worker.outcome = outcome
    res = _invoke("submit", "--recipe", str(recipe_file), "--weights", str(weights), "--wait",
                  "--url", url)  # fmt: skip
    assert res.exit_code == code, res.output
    job_id = res.stderr.split("submitted job ")[1].split()[0]
    assert f"job {job_id}: {outcome}" in res.stdout
    if outcome == "failed":
        assert "weights_mismatch: fc.weight has shape [5, 512]" in res.stdout
    if outcome == "succeeded":
        assert "held-out accuracy" in res.stdout and "88.0%" in res.stdout  # before/after table
        assert "warning latency varied widely" in res.stdout  # the report's warnings

    assert _invoke("watch", job_id, "--url", url).exit_code == code
    assert _invoke("status", job_id, "--url", url).exit_code == code

    out = api_settings.var_dir / "dl"
    res = _invoke("download", job_id, "--out", str(out), "--url", url)
    assert res.exit_code == code, res.output
    if outcome == "succeeded":
        assert json.loads((out / "report.json").read_text())["pruned"] == {"params": 5}
        assert "sha256 ok" in res.stdout
    else:
        assert f"job {job_id} {outcome}" in res.stderr and "no artifacts" in res.stderr
        assert not out.exists() or not any(out.iterdir())


def test_download_of_an_unfinished_job_is_a_usage_error(
    api_server: Any, recipe_file: Path, weights: Path
) -> None:
    with HawadaClient(api_server.url) as hc:
        job_id = hc.submit(recipe_file, weights)["id"]  # the fake worker leaves it queued
    res = _invoke("download", job_id, "--url", api_server.url)
    assert res.exit_code == 2 and "is queued" in res.stderr


def test_download_names_and_unknown_name(
    api_settings: Any, api_server: Any, recipe_file: Path, weights: Path, tmp_path: Path
) -> None:
    job_id = job_with(api_settings, api_server, recipe_file, weights, "succeeded")
    res = _invoke("download", job_id, "--name", "report.json", "--out", str(tmp_path / "a"),
                  "--url", api_server.url)  # fmt: skip
    assert res.exit_code == 0 and (tmp_path / "a" / "report.json").is_file()
    res = _invoke("download", job_id, "--name", "pruned.onnx", "--url", api_server.url)
    assert res.exit_code == 2 and "no artifact 'pruned.onnx'" in res.stderr


def test_watch_without_a_terminal_prints_timestamped_lines(
    api_settings: Any, api_server: Any, recipe_file: Path, weights: Path
) -> None:
    job_id = job_with(api_settings, api_server, recipe_file, weights, "succeeded")
    res = _invoke("watch", job_id, "--url", api_server.url)
    assert res.exit_code == 0
    lines = res.stderr.splitlines()
    assert lines and all(STAMP.match(line) for line in lines), res.stderr
    assert any(line.endswith("loading     started") for line in lines)
    assert any(line.endswith("training    started") for line in lines)
    # The events arrive within milliseconds: one progress line (the phase's first), then quiet.
    progress = [line for line in lines if " step " in line]
    assert len(progress) == 1, progress
    assert f"step 1/{FAKE_STEPS}" in progress[0] and "loss 1" in progress[0]
    assert "cost 0.950 → 0.500" in progress[0] and "eta" in progress[0]
    assert any("max abs diff" in line for line in lines)  # log events are shown


def test_watch_json_prints_every_event(
    api_settings: Any, api_server: Any, recipe_file: Path, weights: Path
) -> None:
    job_id = job_with(api_settings, api_server, recipe_file, weights, "failed")
    res = _invoke("watch", job_id, "--json", "--url", api_server.url)
    assert res.exit_code == 1
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    steps = [e["data"]["step"] for e in events if e["kind"] == "progress"]
    assert steps == list(range(1, FAKE_STEPS + 1))
    assert all(0 < e["data"]["job_progress"] < 1 for e in events if e["kind"] == "progress")


def test_catalog_commands_print_tables_or_json(api_server: Any) -> None:
    url = api_server.url
    res = _invoke("recipes", "--url", url)
    assert res.exit_code == 0
    header = res.stdout.splitlines()[0].split()
    assert header[:3] == ["name", "arch", "classes"]
    assert re.search(
        r"^demo-digits\s+resnet18\s+10\s+3x16x16\s+digits\s+flops 0.5x", res.stdout, re.M
    )
    body = json.loads(_invoke("recipes", "--json", "--url", url).stdout)
    by_name = {r["name"]: r["recipe"] for r in body["items"]}
    res = _invoke("recipes", "demo-digits", "--url", url)
    assert res.exit_code == 0 and yaml.safe_load(res.stdout) == by_name["demo-digits"]
    res = _invoke("recipes", "nope", "--url", url)
    assert res.exit_code == 2 and "demo-digits" in res.stderr

    res = _invoke("archs", "--url", url)
    assert res.exit_code == 0 and re.search(r"^resnet18\s+resnet", res.stdout, re.M)
    names = [
        a["name"] for a in json.loads(_invoke("archs", "--json", "--url", url).stdout)["items"]
    ]
    assert "resnet18" in names
    res = _invoke("archs", "--url", url)
    assert re.search(r"^mobilenet_v3_small\s+mobilenetv3\s+27\s", res.stdout, re.M)
    assert re.search(r"^vit_b_16\s+vision_transformer\s+a vision transformer", res.stdout, re.M)
    res = _invoke("archs", "resnet18", "--url", url)
    assert res.exit_code == 0
    assert re.search(
        r"^stream\.layer1\s+64\s+1\s+yes\s+conv1, bn1, layer1\.0\.conv2", res.stdout, re.M
    )
    res = _invoke("archs", "swin_t", "--url", url)
    assert res.exit_code == 2 and "not supported" in res.stderr


def _commands(group: Any, prefix: str = "") -> list[str]:
    """Every command name under a (Typer's own click) group, sub-commands as "keys create"."""
    out = []
    ctx = group.context_class(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        out.append(f"{prefix}{name}")
        if hasattr(cmd, "list_commands"):
            out += _commands(cmd, f"{prefix}{name} ")
    return out


def test_every_command_has_help_with_an_example() -> None:
    commands = _commands(typer.main.get_command(app))
    names = set(commands)
    assert {"submit", "status", "list", "watch", "cancel", "download", "recipes", "archs",
            "serve", "run", "keys create"} <= names  # fmt: skip
    for name in commands:
        res = runner.invoke(app, [*name.split(), "--help"], terminal_width=200)
        assert res.exit_code == 0, name
        text = " ".join(res.stdout.split())  # rich wraps; compare with single spaces
        assert f"Example: hawada {name}" in text or (
            f"hawada {name}" in text and "Example:" in text
        ), f"{name} --help has no example:\n{res.stdout}"


def test_unreachable_service_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAWADA_")}
    for args in (["status", "abc"], ["watch", "abc"], ["list"], ["recipes"]):
        proc = subprocess.run(
            [sys.executable, "-m", "hawada.cli", *args, "--url", f"http://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 2, args
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"cannot reach http://127.0.0.1:{port}" in lines[0]
        assert "--url" in lines[0] and "HAWADA_URL" in lines[0]


def test_hawada_runs_as_the_readme_says_after_make_install(tmp_path: Path) -> None:
    """README: after `make install`, `source .venv/bin/activate` puts `hawada` on PATH."""
    readme = (ROOT / "README.md").read_text()
    assert "make install\nsource .venv/bin/activate\nhawada --help" in readme
    venv = Path(sys.executable).parent.parent  # the venv running this suite (make test: .venv)
    activate = venv / "bin" / "activate"
    assert activate.is_file(), "tests run outside a virtual environment"
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p).resolve() != (venv / "bin").resolve())  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": path}
    proc = subprocess.run(
        ["bash", "-c", f"source {activate} && hawada --help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submit" in proc.stdout and "Exit codes" in proc.stdout


def test_keys_create_list_revoke(api_settings: Any) -> None:
    res = _invoke("keys", "create", "--owner", "alice", "--name", "laptop")
    assert res.exit_code == 0, res.output
    key = res.stdout.strip().splitlines()[-1]
    assert key.startswith("hwd_")
    from hawada.store.db import session_scope
    from hawada.store.keys import list_keys, resolve_key

    with session_scope(api_settings.database_url) as session:
        assert resolve_key(session, key) == "alice"
        key_id = list_keys(session, owner="alice")[0].id
    res = _invoke("keys", "list", "--owner", "alice")
    assert res.exit_code == 0 and key_id in res.stdout and key not in res.stdout
    assert _invoke("keys", "revoke", key_id).exit_code == 0
    with session_scope(api_settings.database_url) as session:
        assert resolve_key(session, key) is None
    assert _invoke("keys", "revoke", key_id).exit_code == 2


def test_client_modules_never_import_torch() -> None:
    code = "import sys, hawada.client.cli, hawada.client.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_run_with_a_missing_recipe_names_it(tmp_path: Path) -> None:
    res = _invoke("run", "--recipe", str(tmp_path / "r.yaml"), "--weights", str(tmp_path / "w"),
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert res.exit_code == 2 and f"file not found: {tmp_path / 'r.yaml'}" in res.output


@pytest.mark.slow
def test_run_writes_artifacts_in_process(api_settings: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model

    weights = tmp_path / "w.safetensors"
    save_file(build_model("resnet18", num_classes=10, stem="cifar").state_dict(), str(weights))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {
                    "arch": "resnet18",
                    "num_classes": 10,
                    "stem": "cifar",
                    "input_size": [3, 16, 16],
                },
                "data": {"source": "digits", "batch_size": 16, "limit": 96, "val_fraction": 0.25},
                "target": {"metric": "flops", "ratio": 0.5},
                "train": {"steps": 3},
                "finetune": {"epochs": 0},
                "latency": {"batch_size": 2, "repeats": 2, "warmup": 1},
            }
        )
    )
    out = tmp_path / "out"
    res = _invoke("run", "--recipe", str(recipe), "--weights", str(weights), "--out", str(out),
                  "--device", "cpu", "--teacher-cache", str(tmp_path / "teacher"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "teacher").glob("*.safetensors"))) == 1  # kept for later runs
    report = json.loads((out / "report.json").read_text())
    assert "baseline" in res.stdout and f"{report['pruned']['params']:,}" in res.stdout
    assert {"pruned.json", "pruned.safetensors", "report.html"} <= {p.name for p in out.iterdir()}
    assert STAMP.search(res.stdout) and "training    started" in res.stdout  # not a terminal
