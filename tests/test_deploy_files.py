"""The deployment files describe what the service needs: four services, a GPU worker,
environment names the settings class actually reads, and a torch-free API image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hawada.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _stages(dockerfile: str) -> dict[str, str]:
    """Map stage name -> its instructions text."""
    parts = re.split(r"(?im)^FROM\s+", dockerfile)[1:]
    out = {}
    for part in parts:
        header, _, body = part.partition("\n")
        m = re.search(r"(?i)\bAS\s+(\S+)", header)
        if m:
            out[m.group(1)] = header + "\n" + body
    return out


def test_compose_has_the_four_services(compose: dict) -> None:
    assert {"postgres", "redis", "api", "worker"} <= set(compose["services"])


def test_worker_reserves_an_nvidia_gpu(compose: dict) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_env_names_are_settings_fields(compose: dict) -> None:
    fields = set(Settings.model_fields)
    seen = set()
    for name in ("api", "worker"):
        env = compose["services"][name]["environment"]
        for key in env:
            assert key.startswith("HAWADA_"), key
            field = key.removeprefix("HAWADA_").lower()
            assert field in fields, f"{name}: {key} is not a Settings field"
            seen.add(field)
    # The deployment must point both processes at the shared services.
    assert {"database_url", "broker_url", "environment", "auth_required"} <= seen


def test_compose_production_settings_are_accepted(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"]["api"]["environment"]
    for name, value in env.items():  # as the container sees them: environment strings
        monkeypatch.setenv(name, str(value))
    settings = Settings()  # production guard: must not raise
    assert settings.environment == "production" and settings.auth_required
    assert [str(r) for r in settings.data_roots] == ["/data"]


def test_dockerfile_targets_and_torch_free_api() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert {"api", "worker"} <= set(stages)
    assert "torch" not in stages["api"].lower()
    assert "engine" not in stages["api"] and "'.[service]'" in stages["api"]
    assert "torch" in stages["worker"] and "service,engine" in stages["worker"]


def test_api_and_worker_commands_exist(compose: dict) -> None:
    from hawada.cli import app  # the images run `hawada api` and `hawada worker`

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"api", "worker", "serve"} <= names


def test_worker_mounts_datasets_inside_the_data_roots(compose: dict) -> None:
    import json as _json

    worker = compose["services"]["worker"]
    mounts = [v for v in worker["volumes"] if isinstance(v, str) and v.endswith(":/data:ro")]
    assert len(mounts) == 1 and worker["shm_size"] == "2gb"
    roots = _json.loads(worker["environment"]["HAWADA_DATA_ROOTS"])
    assert roots == ["/data"] and compose["services"]["api"]["environment"]["HAWADA_DATA_ROOTS"]
