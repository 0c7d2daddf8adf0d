"""HawAda: latency-aware channel pruning of torchvision CNNs, as a REST service and a library.

    from hawada import HawadaClient, load_pruned

`import hawada` loads neither httpx nor torch: the names are resolved on first use.
`HawadaClient` (and `AsyncHawadaClient`, `HawadaAPIError`, `HawadaConnectionError`) come with
the base install; `load_pruned` needs the engine extra
(`pip install 'hawada[engine]'`) because it rebuilds a torchvision model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hawada.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time see __getattr__
    from hawada.adapters.torchvision import load_pruned
    from hawada.client.client import (
        AsyncHawadaClient,
        HawadaAPIError,
        HawadaClient,
        HawadaConnectionError,
    )

_CLIENT_NAMES = ("AsyncHawadaClient", "HawadaAPIError", "HawadaClient", "HawadaConnectionError")
__all__ = [
    "AsyncHawadaClient",
    "HawadaAPIError",
    "HawadaClient",
    "HawadaConnectionError",
    "__version__",
    "load_pruned",
]


def __getattr__(name: str) -> Any:
    """Resolve the lazy public names (PEP 562)."""
    if name in _CLIENT_NAMES:
        from hawada.client import client

        return getattr(client, name)
    if name == "load_pruned":
        from hawada.extras import require

        require("engine", what="hawada.load_pruned")
        from hawada.adapters.torchvision import load_pruned

        return load_pruned
    raise AttributeError(f"module 'hawada' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CLIENT_NAMES, "load_pruned"])
