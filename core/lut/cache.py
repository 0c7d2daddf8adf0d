"""Keeping latency tables between jobs, keyed by everything that changes a timing.

The key hashes the device name, the caller's parts (arch, input size), the latency settings,
`round_to` and the layer signatures, so later jobs on the same kind of device reuse a table
(and its calibration) instead of profiling again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from hawada.atomic import atomic_write
from hawada.core.device import device_name, resolve_device
from hawada.core.latency import effective_dtype
from hawada.core.layers import LayerSpec
from hawada.core.lut.build import build_lut
from hawada.core.lut.calibration import calibrate
from hawada.core.lut.table import LUT_VERSION, LatencyTable, layer_shape
from hawada.core.recipe import LatencySpec


class LutCache(Protocol):
    """Where built tables live between jobs (a folder for `hawada run`, the DB in the worker)."""

    def get(self, key: str) -> bytes | None:
        """The stored table bytes for `key`, or None."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store (or replace) the table bytes for `key`."""
        ...


_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")


class FolderLutCache:
    """LutCache over a folder: ``<dir>/<key>.json``, written atomically."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):  # keys are hashes; anything else could escape the folder
            raise ValueError(f"invalid latency table key {key!r}")
        return self.dir / f"{key}.json"

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or None."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        """Store atomically (tmp file in the same folder, then rename); replaces an entry."""
        atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))


def lut_key(
    layers: Sequence[LayerSpec],
    spec: LatencySpec,
    device: str | torch.device | None,
    round_to: int,
    key_parts: Mapping[str, Any] | None = None,
    max_points_per_axis: int | None = None,
) -> str:
    """Cache key: hash of the device name, the caller's parts (arch, input size), the latency
    settings and the layer shapes."""
    dev = resolve_device(device)
    batch = spec.batch_size
    doc = {
        "v": LUT_VERSION,
        "device": device_name(dev),
        "parts": {str(k): v for k, v in sorted((key_parts or {}).items())},
        "batch": batch,
        "dtype": effective_dtype(spec.dtype, dev)[0],
        "channels_last": spec.channels_last,
        "round_to": int(round_to),
        "points": max_points_per_axis,
        "layers": sorted({layer_shape(la, batch).signature for la in layers}),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:40]


def get_or_build_lut(
    layers: Sequence[LayerSpec],
    spec: LatencySpec,
    device: str | torch.device | None,
    round_to: int,
    cache: LutCache | None,
    key_parts: Mapping[str, Any] | None = None,
    *,
    max_points_per_axis: int | None = None,
    calibrate_with: Callable[[Mapping[str, int]], float] | None = None,
    n_calibration: int = 4,
) -> LatencyTable:
    """The cached table for these layers on this device, building (and storing) it on a miss.

    With ``calibrate_with`` (a ``widths -> measured ms`` callable, see ``make_width_measurer``)
    an uncalibrated table is fitted to whole-model timings before it is stored, so later jobs
    reuse the calibration too.
    """
    key = lut_key(layers, spec, device, round_to, key_parts, max_points_per_axis)
    table: LatencyTable | None = None
    if cache is not None:
        data = cache.get(key)
        if data is not None:
            try:
                table = LatencyTable.from_bytes(data)
            except ValueError:
                table = None  # a corrupt entry is rebuilt, not trusted
    fresh = table is None
    if table is None:
        table = build_lut(layers, spec, device, round_to, max_points_per_axis, key=key)
    changed = fresh
    if calibrate_with is not None and not table.meta.get("calibration_samples"):
        calibrate(table, layers, calibrate_with, n_random=n_calibration)
        changed = True
    if cache is not None and changed:
        cache.put(key, table.to_bytes())
    return table
