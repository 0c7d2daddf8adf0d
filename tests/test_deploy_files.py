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


_VAR = re.compile(r"\$\{([A-Z_]+)(?::([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` (which refuses when unset)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise LookupError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return _VAR.sub(one, value)


SECRETS = {"HAWADA_DB_PASSWORD": "s3cret-db-Xq81", "HAWADA_REDIS_PASSWORD": "s3cret-redis-Pz2"}


def test_compose_production_settings_are_accepted(
    compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"]["api"]["environment"]
    for name, value in env.items():  # as the container sees them: interpolated strings
        monkeypatch.setenv(name, interpolate(str(value), SECRETS))
    settings = Settings()  # production guard: must not raise
    assert settings.environment == "production" and settings.auth_required
    assert [str(r) for r in settings.data_roots] == ["/data"]
    assert settings.broker_url == "redis://:s3cret-redis-Pz2@redis:6379/0"


def test_compose_refuses_to_start_without_passwords(compose: dict) -> None:
    """No password has a default: each place that needs one stops compose when it is unset."""
    text = (ROOT / "docker-compose.yml").read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(:?[-?][^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (name, uses)
    for service in ("api", "worker"):
        env = compose["services"][service]["environment"]
        for missing in SECRETS:
            partial = {k: v for k, v in SECRETS.items() if k != missing}
            every_value = " ".join(str(v) for v in env.values())
            with pytest.raises(LookupError, match=missing):
                interpolate(every_value, partial)
    redis_env = compose["services"]["redis"]["environment"]
    with pytest.raises(LookupError):
        interpolate(redis_env["REDISCLI_AUTH"], {})


def test_production_guard_refuses_default_secrets() -> None:
    base = {"environment": "production", "auth_required": True}
    pg = "postgresql+psycopg://hawada:{}@db:5432/hawada"
    good_broker = "redis://:s3cret-redis@redis:6379/0"
    Settings(**base, database_url=pg.format("s3cret-db"), broker_url=good_broker)
    for password in ("change-me", "postgres", "CHANGEME"):
        with pytest.raises(ValueError, match="database_url"):
            Settings(**base, database_url=pg.format(password), broker_url=good_broker)
    for broker in ("redis://redis:6379/0", "redis://:change-me@redis:6379/0"):
        with pytest.raises(ValueError, match="broker_url"):
            Settings(**base, database_url=pg.format("s3cret-db"), broker_url=broker)
    with pytest.raises(ValueError, match="operator_key"):
        Settings(
            **base,
            database_url=pg.format("s3cret-db"),
            broker_url=good_broker,
            operator_key="change-me",
        )


def test_compose_is_safe_by_default(compose: dict) -> None:
    services = compose["services"]
    # The API is published on loopback unless HAWADA_BIND says otherwise.
    ports = services["api"]["ports"]
    assert ports and all(interpolate(p, {}).startswith("127.0.0.1:") for p in ports)
    # Every service has a memory limit and a health check; dependencies wait for health.
    for name, svc in services.items():
        assert interpolate(str(svc["mem_limit"]), {}).rstrip("gm").isdigit(), name
        assert svc["healthcheck"]["test"], name
        for dep in svc.get("depends_on", {}).values():
            assert dep["condition"] == "service_healthy", name
    assert set(services["worker"]["depends_on"]) == {"api", "redis", "postgres"}
    # Redis persists its queue and never evicts a queued job's message.
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command


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
