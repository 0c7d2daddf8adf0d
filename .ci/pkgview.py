"""Run a static tool on the installed layout of the `hawada` package.

The repository keeps one folder per layer at the top level (`core/`, `api/`, ...) and the build
maps them into the `hawada` namespace (pyproject `[tool.setuptools] package-dir`). Static tools
that find modules by walking folders (mypy, import-linter's grimp) cannot follow that mapping,
so this script mirrors it as a tree of symlinks, `build/pkgview/hawada/...`, runs the command in
that folder with it first on PYTHONPATH/MYPYPATH, and rewrites the paths in its output back to
the files in the repository.

    python .ci/pkgview.py -- mypy -p hawada
    python .ci/pkgview.py -- lint-imports
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEW = ROOT / "build" / "pkgview"


def package_dirs() -> dict[str, str]:
    """pyproject's package-dir mapping: package name -> repository folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(config["tool"]["setuptools"]["package-dir"])


def build_view() -> dict[str, str]:
    """(Re)create the symlink tree; returns view folder prefix -> repository folder prefix."""
    shutil.rmtree(VIEW, ignore_errors=True)
    back: dict[str, str] = {}
    for package, folder in package_dirs().items():
        src = ROOT / folder
        dst = VIEW.joinpath(*package.split("."))
        back[str(dst.relative_to(VIEW)) + "/"] = folder.rstrip("/") + "/"
        for path in src.rglob("*"):
            rel = path.relative_to(src)
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            # Nested mapped packages (none today) would be linked by their own entry.
            if path.suffix not in (".py", ".pyi", ".typed", ".json"):
                continue
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(path)
    # Tools read their configuration from the working folder, which is the view (so that the
    # repository's own hawada/ folder cannot shadow the mapped package).
    (VIEW / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    return back


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    if command and not os.path.isabs(command[0]) and (ROOT / command[0]).exists():
        command[0] = str(ROOT / command[0])  # e.g. .venv/bin/python: the command runs in VIEW
    back = build_view()
    env = dict(os.environ)
    env.setdefault("MYPY_CACHE_DIR", str(ROOT / ".mypy_cache"))  # the view is rebuilt each run
    for var in ("PYTHONPATH", "MYPYPATH"):
        env[var] = os.pathsep.join(filter(None, [str(VIEW), env.get(var)]))
    proc = subprocess.run(command, cwd=VIEW, env=env, capture_output=True, text=True)
    # Paths in the output are relative to the view (or absolute): map them back to the
    # repository's folders, longest prefix first (hawada/core/ before hawada/).
    prefixes = "|".join(re.escape(p) for p in sorted(back, key=len, reverse=True))
    pattern = re.compile(rf"(?:{re.escape(str(VIEW))}/|(?<![\w/.]))({prefixes})")

    def repl(m: re.Match[str]) -> str:
        return back[m.group(1)]

    sys.stdout.write(pattern.sub(repl, proc.stdout))
    sys.stderr.write(pattern.sub(repl, proc.stderr))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
