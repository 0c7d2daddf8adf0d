"""Per-layer latency lookup tables and the differentiable latency cost built on them.

FLOPs do not predict latency (a channel count just past a GPU tile multiple pays for a whole
extra tile), so the latency of every conv/linear of the model is *measured* on the running device
over a grid of (input channels, output channels) at the widths the exporter can emit: multiples
of `round_to` plus the full width. Identical layers share one entry. Between grid points the
table is interpolated bilinearly, which makes it differentiable in the (expected) widths so gate
training can descend on it. A scale and offset fitted to whole-model timings absorb what
per-layer timings miss (residual adds, pooling, launch gaps).

Modules, one concern each: `table` (signatures, the table and its JSON form), `build`
(measuring a table), `cost` (`LatencyCost`, the `CostModel`), `calibration` (fitting the table
to whole-model timings), `cache` (keys, `LutCache`, `get_or_build_lut`).
"""

from __future__ import annotations

from hawada.core.lut.build import build_lut
from hawada.core.lut.cache import FolderLutCache, LutCache, get_or_build_lut, lut_key
from hawada.core.lut.calibration import (
    ExportFn,
    WidthMeasurer,
    calibrate,
    fit_calibration,
    make_width_measurer,
    random_widths,
)
from hawada.core.lut.cost import LatencyCost
from hawada.core.lut.table import (
    LUT_VERSION,
    LatencyTable,
    LayerShape,
    LutEntry,
    axis_values,
    layer_shape,
)

__all__ = [
    "LUT_VERSION",
    "ExportFn",
    "FolderLutCache",
    "LatencyCost",
    "LatencyTable",
    "LayerShape",
    "LutCache",
    "LutEntry",
    "WidthMeasurer",
    "axis_values",
    "build_lut",
    "calibrate",
    "fit_calibration",
    "get_or_build_lut",
    "layer_shape",
    "lut_key",
    "make_width_measurer",
    "random_widths",
]
