"""HawAda: latency-aware channel pruning of torchvision CNNs, as a REST service and a library.

    from hawada import HawadaClient, load_pruned

`import hawada` loads neither httpx nor torch: the two names are resolved on first use.
`HawadaClient` comes with the base install; `load_pruned` needs the engine extra
(`pip install 'hawada[engine]'`) because it rebuilds a torchvision model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hawada.version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time see __getattr__
    from hawada.adapters.torchvision import load_pruned
    from hawada.client.client import HawadaClient

__all__ = ["HawadaClient", "__version__", "load_pruned"]


def __getattr__(name: str) -> Any:
    """Resolve the lazy public names (PEP 562)."""
    if name == "HawadaClient":
        from hawada.client.client import HawadaClient

        return HawadaClient
    if name == "load_pruned":
        from hawada.extras import require

        require("engine", what="hawada.load_pruned")
        from hawada.adapters.torchvision import load_pruned

        return load_pruned
    raise AttributeError(f"module 'hawada' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "HawadaClient", "load_pruned"])
