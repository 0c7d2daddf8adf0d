"""Per-layer latency tables: the measured grid of every layer signature and its JSON form.

Identical layers (ResNets repeat blocks) share one `LayerShape` signature and one entry. An
entry holds measured milliseconds over a grid of (input channels, output channels) at the widths
the exporter can emit. Tables are data, never code: they are stored as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from hawada.core.layers import LayerSpec, input_parts

LUT_VERSION = 1


@dataclass(frozen=True)
class LayerShape:
    """Everything about one conv/linear that its latency depends on, plus its width axes."""

    kind: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups_mode: str  # "dense" | "tied:<channels per group>" | "fixed:<groups>"
    in_hw: tuple[int, int]
    batch: int
    cin: int  # full input channels
    cout: int  # full output channels
    cin_varies: bool
    cout_varies: bool

    @property
    def signature(self) -> str:
        """Stable text key of the table entry this layer uses."""
        ci = f"{self.cin}{'v' if self.cin_varies else 'f'}"
        co = f"{self.cout}{'v' if self.cout_varies else 'f'}"
        k, s, p, d, hw = self.kernel, self.stride, self.padding, self.dilation, self.in_hw
        return (
            f"{self.kind}|k{k[0]}x{k[1]}|s{s[0]}x{s[1]}|p{p[0]}x{p[1]}|d{d[0]}x{d[1]}"
            f"|{self.groups_mode}|in{hw[0]}x{hw[1]}|b{self.batch}|ci{ci}|co{co}"
        )


def layer_shape(layer: LayerSpec, batch: int) -> LayerShape:
    """The LayerShape of a `LayerSpec` at batch size `batch`."""
    kind = layer.kind
    kernel, stride, padding, dilation, in_hw = (
        layer.kernel,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.in_hw,
    )
    groups = layer.groups or 1
    tied = layer.tied_groups
    cin, cout = layer.in_channels, layer.out_channels
    if kind == "linear":
        batch = batch * layer.out_hw[0] * layer.out_hw[1]  # a linear over positions: more rows
        kernel, stride, padding, dilation, in_hw, mode = (
            (1, 1),
            (1, 1),
            (0, 0),
            (1, 1),
            (1, 1),
            "dense",
        )
    elif tied:
        mode = f"tied:{cin // groups}"
    elif groups > 1:
        mode = f"fixed:{groups}"
    else:
        mode = "dense"
    varies = any(g is not None for g, _, _ in input_parts(layer))
    cin_varies = varies and not tied  # tied: cin follows cout
    return LayerShape(
        kind,
        kernel,
        stride,
        padding,
        dilation,
        mode,
        in_hw,
        int(batch),
        cin,
        cout,
        cin_varies,
        layer.out_group is not None,
    )


def axis_step(shape: LayerShape, round_to: int) -> int:
    """Channel step of an axis: round_to, widened so grouped convs keep whole groups."""
    if shape.groups_mode.startswith("tied:"):
        unit = int(shape.groups_mode.split(":")[1])
        return round_to * unit // math.gcd(round_to, unit)  # as GateGroup.from_channels snaps
    if shape.groups_mode.startswith("fixed:"):
        g = int(shape.groups_mode.split(":")[1])
        return round_to * g // math.gcd(round_to, g)
    return round_to


def axis_values(full: int, step: int, max_points: int) -> list[int]:
    """Widths sampled on one axis: multiples of ``step`` up to ``full``, plus ``full``.

    When there are more than ``max_points`` the smallest and the full width are always kept and
    the rest are spread evenly over the ladder (interpolation covers the gaps).
    """
    ladder = [*range(step, full, step), full]
    if len(ladder) <= max_points:
        return ladder
    n = max(2, max_points)
    idx = sorted({round(i * (len(ladder) - 1) / (n - 1)) for i in range(n)})
    return [ladder[i] for i in idx]


# --------------------------------------------------------------------------- the table


@dataclass
class LutEntry:
    """Measured ms of one layer signature over a (cin values) x (cout values) grid."""

    cin: list[int]
    cout: list[int]
    ms: list[list[float]]  # ms[i][j] at (cin[i], cout[j])


@dataclass
class LatencyTable:
    """Per-layer latency table of one (device, model shapes, latency settings) combination."""

    key: str
    device: str
    entries: dict[str, LutEntry]
    build_seconds: float = 0.0
    scale: float = 1.0
    offset: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def points(self) -> int:
        """Number of measured grid points over all entries."""
        return sum(len(e.cin) * len(e.cout) for e in self.entries.values())

    def summary(self) -> dict[str, Any]:
        """What report.json shows about the table."""
        return {
            "entries": len(self.entries),
            "points": self.points,
            "build_seconds": round(self.build_seconds, 3),
            "device": self.device,
            "key": self.key,
            "scale": self.scale,
            "offset_ms": self.offset,
            "calibrated": bool(self.meta.get("calibration_samples")),
        }

    def to_bytes(self) -> bytes:
        """JSON encoding (no pickle: a cached table is data, never code)."""
        doc = {
            "version": LUT_VERSION,
            "key": self.key,
            "device": self.device,
            "build_seconds": self.build_seconds,
            "scale": self.scale,
            "offset": self.offset,
            "meta": self.meta,
            "entries": {
                s: {"cin": e.cin, "cout": e.cout, "ms": e.ms} for s, e in self.entries.items()
            },
        }
        return json.dumps(doc, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> LatencyTable:
        """Inverse of ``to_bytes``; raises ValueError on anything malformed."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("version") != LUT_VERSION:
                raise ValueError(f"unsupported table version {doc.get('version')!r}")
            entries = {
                str(s): LutEntry(
                    [int(v) for v in e["cin"]],
                    [int(v) for v in e["cout"]],
                    [[float(v) for v in row] for row in e["ms"]],
                )
                for s, e in doc["entries"].items()
            }
            for s, e in entries.items():
                if len(e.ms) != len(e.cin) or any(len(r) != len(e.cout) for r in e.ms):
                    raise ValueError(f"entry {s}: grid shape does not match its axes")
            return cls(
                key=str(doc["key"]),
                device=str(doc["device"]),
                entries=entries,
                build_seconds=float(doc["build_seconds"]),
                scale=float(doc["scale"]),
                offset=float(doc["offset"]),
                meta=dict(doc.get("meta") or {}),
            )
        except (AttributeError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a latency table: {e}") from e
