"""The architecture catalogue, torch-free: which torchvision architectures a recipe may name.

The catalogue is the checked-in data file `core/architectures.json`, GENERATED from the one
architecture registry in `hawada.adapters.torchvision` (`python -m
hawada.adapters.torchvision.catalog --write`; a test fails when the two disagree). It lists every
torchvision classification architecture: the registered ones as supported, the others with the
reason they are not. The API and the recipe schema read it here without importing torch.

Each entry is an object with `name`, `family`, `supported` and, when unsupported, `reason`;
further keys (per-arch coupling groups, state-dict shape tables, ...) are kept in
`ArchInfo.details` so the file can grow without a format change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = [
    "CATALOGUE_FILE",
    "CATALOGUE_FORMAT",
    "ArchInfo",
    "arch_problem",
    "catalogue",
    "expected_state_dict",
    "parse_catalogue",
    "placeholder_safetensors",
    "supported_architectures",
]

CATALOGUE_FILE = "architectures.json"
CATALOGUE_FORMAT = "hawada.architectures.v1"
_CORE_KEYS = ("name", "family", "supported", "reason")


@dataclass(frozen=True)
class ArchInfo:
    """One catalogue entry."""

    name: str
    family: str
    supported: bool
    reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


def parse_catalogue(text: str) -> dict[str, ArchInfo]:
    """Entries of a catalogue file's text, by name; ValueError when it is malformed."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != CATALOGUE_FORMAT:
        raise ValueError(f"not a {CATALOGUE_FORMAT} catalogue")
    out: dict[str, ArchInfo] = {}
    for entry in doc["architectures"]:
        name, family, supported = entry["name"], entry["family"], entry["supported"]
        if not (isinstance(name, str) and isinstance(family, str) and isinstance(supported, bool)):
            raise ValueError(f"malformed catalogue entry {entry!r}")
        details = {k: v for k, v in entry.items() if k not in _CORE_KEYS}
        out[name] = ArchInfo(name, family, supported, entry.get("reason"), details)
    return out


@lru_cache(maxsize=1)
def catalogue() -> dict[str, ArchInfo]:
    """The shipped catalogue (package data next to this module), by architecture name."""
    text = resources.files("hawada.core").joinpath(CATALOGUE_FILE).read_text(encoding="utf-8")
    return parse_catalogue(text)


def supported_architectures() -> dict[str, str]:
    """Architectures a recipe's `model.arch` may name -> their adapter family, sorted by name."""
    return {
        a.name: a.family for a in sorted(catalogue().values(), key=lambda a: a.name) if a.supported
    }


def arch_problem(name: str) -> str | None:
    """Why `name` cannot be used as `model.arch` (None when it can)."""
    info = catalogue().get(name)
    if info is not None and info.supported:
        return None
    supported = ", ".join(supported_architectures())
    if info is None:
        return f"unknown architecture {name!r}; supported: {supported}"
    return f"architecture {name!r} is not supported: {info.reason}; supported: {supported}"


def _decode_shape(code: str, num_classes: int) -> tuple[int, ...]:
    return tuple(num_classes if d == "C" else int(d) for d in code.split("x")) if code else ()


def expected_state_dict(
    arch: str, num_classes: int, stem: str
) -> dict[str, tuple[int, ...]] | None:
    """The state-dict shapes of `arch` built for `num_classes` and `stem`, in model order.

    From the catalogue's generated shape table; None when the catalogue has no table for it.
    """
    info = catalogue().get(arch)
    table = info.details.get("state_dict") if info is not None else None
    if not isinstance(table, dict):
        return None
    overrides = info.details.get("stems", {}).get(stem, {}) if info is not None else {}
    out: dict[str, tuple[int, ...]] = {}
    for key, code in table.items():
        code = overrides.get(key, code)
        if code is not None:
            out[key] = _decode_shape(code, num_classes)
    for key, code in overrides.items():
        if key not in table and code is not None:
            out[key] = _decode_shape(code, num_classes)
    return out


def placeholder_safetensors(shapes: Mapping[str, Sequence[int]]) -> bytes:
    """A safetensors file with these tensor names and shapes (e.g. `expected_state_dict`'s)
    whose values are zero bytes (dtype U8, a quarter of float32's size), built without torch.

    For tests and benchmarks that submit jobs: the API checks at submission that the weights
    fit the recipe's architecture, and never reads values it has no reason to (only floats are
    checked for NaN).
    """
    header: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        header[name] = {
            "dtype": "U8",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)
