"""Which optional dependency groups ("extras") are installed, and one clear error when not.

The base install is the HTTP client and the `hawada` command's client side. Everything that
trains or serves needs an extra; a command that lacks one fails with a single line naming the
`pip install` that fixes it instead of a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib.util

#: Import names that must be present for each extra (its heavy, defining dependencies).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "engine": (
        "torch",
        "torchvision",
        "safetensors",
        "numpy",
        "sklearn",
        "mlxtend",
        "pydantic_settings",
    ),
    "service": (
        "fastapi",
        "uvicorn",
        "multipart",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "celery",
        "redis",
        "prometheus_client",
        "pydantic_settings",
    ),
}


class MissingExtra(ImportError):
    """A feature was used without the extra that provides its dependencies."""

    def __init__(self, extra: str, what: str, missing: list[str]) -> None:
        self.extra, self.what, self.missing = extra, what, missing
        super().__init__(
            f"{what} needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'hawada[{extra}]'"
        )


def missing_modules(extra: str) -> list[str]:
    """The import names of `extra` that cannot be found (empty when it is installed)."""
    return [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]


def require(*extras: str, what: str) -> None:
    """Raise `MissingExtra` for the first of `extras` that is not fully installed."""
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            raise MissingExtra(extra, what, missing)
