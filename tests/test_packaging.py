"""The package as a user installs it: one `hawada` namespace in the wheel, the extras split, and
the base install (the client only) talking to a running service from a fresh virtualenv."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import ROOT, Service, base_env, tiny_recipe

from hawada.core.architectures import supported_architectures
from hawada.version import __version__

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
LAYERS = ("core", "adapters", "api", "store", "worker", "client", "recipes")
DIST_INFO = f"hawada-{__version__}.dist-info"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist, then the wheel built from that sdist (as `pip install` from an index would)."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("hawada-*.whl")
    return whl


def _names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as zf:
        return set(zf.namelist())


def test_wheel_adds_only_the_hawada_namespace(wheel: Path) -> None:
    assert {n.split("/", 1)[0] for n in _names(wheel)} == {"hawada", DIST_INFO}


def test_wheel_holds_each_file_once(wheel: Path) -> None:
    """The build follows package-dir, not the hawada/<layer> links: no file twice, no nesting."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert len(names) == len(set(names))
    layers = [p.split(".", 1)[1] for p in PACKAGE_DIRS if p != "hawada"]
    assert not [n for n in names if n.startswith("hawada/hawada/")]
    assert not [n for n in names for lay in layers if n.startswith(f"hawada/{lay}/{lay}/")]


def test_wheel_installs_the_hawada_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert "[console_scripts]" in entry_points
    assert "hawada = hawada.cli:main" in entry_points


def test_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    """The explicit package list in pyproject misses nothing, and the data files ship."""
    names = _names(wheel)
    for package, folder in PACKAGE_DIRS.items():
        prefix = package.replace(".", "/")
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder).as_posix()
            assert f"{prefix}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    data = {
        "hawada/py.typed",
        "hawada/core/architectures.json",
        "hawada/store/alembic.ini",
        "hawada/store/migrations/script.py.mako",
        *(f"hawada/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")),
        *(
            f"hawada/store/migrations/versions/{p.name}"
            for p in (ROOT / "store/migrations/versions").glob("*.py")
        ),
    }
    assert data <= names, sorted(data - names)


def test_base_requirements_are_the_client_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(f"{DIST_INFO}/METADATA").decode()
    requires = [
        ln.split(":", 1)[1].strip()
        for ln in metadata.splitlines()
        if ln.startswith("Requires-Dist:")
    ]
    base = {
        r.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        for r in requires
        if "extra ==" not in r
    }
    assert base == {"httpx", "typer", "rich", "pyyaml", "pydantic"}
    extras = {
        ln.split(":", 1)[1].strip()
        for ln in metadata.splitlines()
        if ln.startswith("Provides-Extra:")
    }
    assert {"engine", "service", "dev", "bench"} <= extras
    service = " ".join(r for r in requires if 'extra == "service"' in r)
    engine = " ".join(r for r in requires if 'extra == "engine"' in r)
    for name in ("fastapi", "celery", "sqlalchemy", "psycopg"):
        assert name in service and name not in engine
    assert "torch" in engine and "torch" not in service


NON_EDITABLE_CHECK = """
import json, sys, tempfile
from pathlib import Path
import hawada
from hawada.core.architectures import supported_architectures
from hawada.core.recipe import builtin_recipes
from hawada.store.db import MIGRATIONS_DIR, init_db

url = "sqlite:///" + str(Path(tempfile.mkdtemp()) / "h.db")
init_db(url)  # Alembic runs from the migrations shipped in the wheel
print(json.dumps({"file": hawada.__file__, "archs": list(supported_architectures()),
                  "recipes": sorted(builtin_recipes()), "migrations": MIGRATIONS_DIR.is_dir()}))
"""


def test_non_editable_install_finds_its_data(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel (not the checkout), the catalogue, recipes and migrations load."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", NON_EDITABLE_CHECK],
        cwd=tmp_path,  # not the repository: its hawada/ folder must not shadow the install
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert Path(found["file"]).is_relative_to(target)
    assert found["archs"] == list(supported_architectures())
    assert "demo-digits" in found["recipes"] and found["migrations"] is True


def test_no_module_imports_a_bare_layer_name() -> None:
    """Everything imports `hawada.<layer>`: a bare `import core` only works from a checkout."""
    offenders = []
    folders = [*set(PACKAGE_DIRS.values()), "tests", "bench"]
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {m}"
                    for m in mods
                    if m.split(".")[0] in LAYERS
                ]
    assert offenders == []


# -- the layer folders as hawada.<layer> for tools that walk folders --------------------------

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # the dev extra's console script
CONTRACTS: list[dict[str, object]] = PYPROJECT["tool"]["importlinter"]["contracts"]


def test_hawada_links_every_layer_folder() -> None:
    """`hawada/<layer>` is a relative link to `<layer>/` for each package-dir entry: grimp
    (lint-imports) and mypy walk the `hawada/` folder and find hawada.<layer> through it."""
    for package, folder in PACKAGE_DIRS.items():
        if package == "hawada":
            continue
        link = ROOT.joinpath(*package.split("."))
        assert link.is_symlink(), f"{link.relative_to(ROOT)} is not a link to {folder}/"
        assert os.readlink(link) == os.path.relpath(ROOT / folder, link.parent)
        assert link.resolve() == (ROOT / folder).resolve()


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed (the dev extra)")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},  # one contract per line
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bare_lint_imports_keeps_every_contract() -> None:
    """Plain `lint-imports` in the repository root sees every layer and keeps every contract."""
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in proc.stdout


def test_bare_lint_imports_reports_a_layer_violation(tmp_path: Path) -> None:
    """In a copy of the checkout (links kept as links), core importing the api breaks the core
    contract: the bare command checks the layers' real imports, it does not pass vacuously."""
    for name in ("pyproject.toml", *PACKAGE_DIRS.values()):
        src = ROOT / name
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(src, tmp_path / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, tmp_path / name)
    with (tmp_path / "core" / "errors.py").open("a", encoding="utf-8") as f:
        f.write("\nimport hawada.api\n")
    proc = _lint_imports(tmp_path)
    (core,) = [c["name"] for c in CONTRACTS if c.get("source_modules") == ["hawada.core"]]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{core} BROKEN" in proc.stdout
    assert "hawada.core.errors -> hawada.api" in proc.stdout


# -- the base install against a real service ---------------------------------------------------

CLIENT_SCRIPT = """
import json, sys
import hawada
from hawada import HawadaClient

url, weights, out, recipe = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
result = {"file": hawada.__file__, "version": hawada.__version__}
result["heavy_imports"] = sorted(
    m for m in ("torch", "fastapi", "sqlalchemy", "celery") if m in sys.modules
)
with HawadaClient(url) as hc:
    result["archs"] = [a["name"] for a in hc.architectures()["items"]]
    result["recipes"] = sorted(r["name"] for r in hc.recipes()["items"])
    job = hc.submit(recipe, weights)
    result["submitted"] = job["status"]
    job = hc.wait(job["id"], poll_s=0.5, timeout=400)
    result["status"], result["error"] = job["status"], job.get("error")
    if job["status"] == "succeeded":
        result["downloaded"] = sorted(p.name for p in hc.download_all(job["id"], out))
        result["report"] = json.loads((__import__("pathlib").Path(out) / "report.json").read_text())
try:
    hawada.load_pruned
except ImportError as exc:
    result["load_pruned"] = str(exc)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def base_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with only the base wheel installed (its dependencies from the index)."""
    env_dir = tmp_path_factory.mktemp("venv") / "base"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env_dir


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Not from the repository: its hawada/ folder must not shadow the installed wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["COLUMNS"] = "200"  # one-line error messages stay on one line
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """`hawada serve` from the development environment (it has the service and engine extras)."""
    var_dir = tmp_path / "var"
    var_dir.mkdir()
    svc = Service(base_env(var_dir), var_dir, embedded=True)
    try:
        yield svc
    finally:
        svc.stop()


@pytest.mark.slow
def test_base_install_has_no_service_or_engine(base_venv: Path, tmp_path: Path) -> None:
    python, hawada = base_venv / "bin" / "python", base_venv / "bin" / "hawada"
    code = (
        "import importlib.util as u; print([m for m in "
        "('torch', 'fastapi', 'sqlalchemy', 'celery', 'psycopg') if u.find_spec(m)])"
    )
    assert _run([str(python), "-c", code], tmp_path).stdout.strip() == "[]"
    helped = _run([str(hawada), "--help"], tmp_path)
    assert helped.returncode == 0
    assert all(c in helped.stdout for c in ("submit", "watch", "archs", "serve", "run", "keys"))
    for command, extra in (("serve", "service"), ("api", "service"), ("worker", "service")):
        refused = _run([str(hawada), command], tmp_path)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"pip install 'hawada[{extra}]'" in refused.stdout + refused.stderr
    refused = _run(
        [str(hawada), "run", "--recipe", "r.yaml", "--weights", "w.pt", "--out", "o"], tmp_path
    )
    assert refused.returncode == 2 and "pip install 'hawada[engine]'" in refused.stdout


@pytest.mark.slow
def test_base_install_client_runs_a_job_on_a_service(
    base_venv: Path, service: Service, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from hawada.adapters.torchvision import build_model

    weights = tmp_path / "resnet18.safetensors"
    save_file(build_model("resnet18", num_classes=10, stem="cifar").state_dict(), str(weights))
    script = tmp_path / "client_check.py"
    script.write_text(CLIENT_SCRIPT, encoding="utf-8")
    out = tmp_path / "result"
    proc = _run(
        [
            str(base_venv / "bin" / "python"),
            str(script),
            service.url,
            str(weights),
            str(out),
            json.dumps(tiny_recipe()),
        ],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n" + service.tail()
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(base_venv)  # the wheel, not the checkout
    assert result["version"] == __version__
    assert result["heavy_imports"] == []
    assert result["archs"] == list(supported_architectures())
    assert "demo-digits" in result["recipes"]
    assert result["submitted"] == "queued"
    assert result["status"] == "succeeded", (result["error"], service.tail())
    assert {"pruned.safetensors", "pruned.json", "report.json", "report.html"} <= set(
        result["downloaded"]
    )
    report = result["report"]
    assert report["pruned"]["flops"] < report["baseline"]["flops"]
    assert "pip install 'hawada[engine]'" in result["load_pruned"]
    # The CLI of the base install talks to the service too.
    archs = _run([str(base_venv / "bin" / "hawada"), "archs", "--url", service.url], tmp_path)
    assert archs.returncode == 0 and "resnet18" in archs.stdout
