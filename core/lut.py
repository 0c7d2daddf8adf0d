"""Per-layer latency lookup table and the differentiable latency cost built on it.

FLOPs do not predict latency (a channel count just past a GPU tile multiple pays for a whole
extra tile), so the latency of every conv/linear of the model is *measured* on the running device
over a grid of (input channels, output channels) at the widths the exporter can emit — multiples
of ``round_to`` plus the full width. Identical layers (ResNets repeat blocks) share one entry.
Between grid points the table is interpolated bilinearly, which makes it differentiable in the
(expected) widths so gate training can descend on it. A scale and offset fitted to whole-model
timings absorb what per-layer timings miss (residual adds, pooling, launch gaps).

Tables are cached by a key over everything that changes a timing (device, arch, input size,
batch, dtype, memory format, round_to, layer shapes), so later jobs on the same device reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawada.core.cost import group_widths
from hawada.core.latency import (
    DTYPES,
    device_name,
    effective_dtype,
    measure_latency,
    resolve_device,
    spec_value,
    summarize,
    time_callable,
)

LUT_VERSION = 1
# Per grid point a few repeats suffice (the recipe's long run is for whole models): points are many.
_CPU_REPEATS, _CPU_WARMUP, _CPU_POINTS = 5, 1, 6
_GPU_REPEATS, _GPU_WARMUP, _GPU_POINTS = 20, 5, 12
_CPU_BUDGET_S, _GPU_BUDGET_S = 30.0, 120.0  # build-time budgets (grid shrinks to fit), with
# headroom: on a shared CPU the estimate from one probe timing can be off by half


# --------------------------------------------------------------------------- signatures


def _pair(v: Any, default: tuple[int, int]) -> tuple[int, int]:
    if v is None:
        return default
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


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


def layer_shape(layer: Any, batch: int) -> LayerShape:
    """The LayerShape of a ``core.cost.LayerSpec``.

    LayerSpec records the output size; stride/padding/input size are read when the adapter
    provides them and otherwise taken as a same-size conv (stride 1, "same" padding) with the
    same output — identical FLOPs, so the calibration absorbs the small memory-traffic gap.
    """
    kind = str(layer.kind)
    kernel = _pair(getattr(layer, "kernel", None), (1, 1))
    out_hw = _pair(getattr(layer, "out_hw", None), (1, 1))
    stride = _pair(getattr(layer, "stride", None), (1, 1))
    padding = _pair(getattr(layer, "padding", None), (kernel[0] // 2, kernel[1] // 2))
    dilation = _pair(getattr(layer, "dilation", None), (1, 1))
    in_hw = _pair(getattr(layer, "in_hw", None), (out_hw[0] * stride[0], out_hw[1] * stride[1]))
    groups = int(getattr(layer, "groups", 1) or 1)
    tied = bool(getattr(layer, "tied_groups", False))
    cin, cout = int(layer.in_channels), int(layer.out_channels)
    if kind == "linear":
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
    cin_varies = layer.in_group is not None and not tied  # tied: cin follows cout
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


def _axis_step(shape: LayerShape, round_to: int) -> int:
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
    ladder = list(range(step, full, step)) + [full]
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


# --------------------------------------------------------------------------- building


def _time_point(
    shape: LayerShape,
    cin: int,
    cout: int,
    weight: Tensor,
    bn: tuple[Tensor, ...],
    x_full: Tensor,
    dev: torch.device,
    channels_last: bool,
    repeats: int,
    warmup: int,
    clock: str,
) -> float:
    """ms of one layer at (cin, cout): conv + BN + ReLU, as a pruned block runs it."""
    if shape.kind == "linear":
        x = x_full[:, :cin].contiguous()
        w = weight[:cout, :cin].contiguous()
        b = bn[0][:cout].contiguous()
        fn = lambda: F.linear(x, w, b)
    else:
        if shape.groups_mode.startswith("tied:"):
            per = int(shape.groups_mode.split(":")[1])
            groups, cin = cout // per, cout
            w = weight[:cout].contiguous()  # weight is (cout_full, per, kh, kw)
        else:
            groups = (
                int(shape.groups_mode.split(":")[1])
                if shape.groups_mode.startswith("fixed:")
                else 1
            )
            w = weight[:cout, : cin // groups].contiguous()
        x = x_full[:, :cin].contiguous()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        mean, var, gamma, beta = (t[:cout].contiguous() for t in bn)
        stride, padding, dilation = shape.stride, shape.padding, shape.dilation

        def fn() -> Tensor:
            y = F.conv2d(x, w, None, stride, padding, dilation, groups)
            return F.relu(F.batch_norm(y, mean, var, gamma, beta, False, 0.0, 1e-5))

    with torch.inference_mode():
        times = time_callable(fn, dev, repeats, warmup, clock)
    # CPU: the fastest repeat — on a shared host a neighbour's burst inflates the others, and
    # contention is not a property of the layer (the calibration maps to whole-model medians).
    # GPU timings are steady: the median.
    return min(times) if dev.type == "cpu" else summarize(times)[0]


def _entry_tensors(
    shape: LayerShape, dev: torch.device, dtype: torch.dtype
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """Full-width weight, BN tensors and input of one signature; grid points slice them."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if shape.kind == "linear":
        weight = torch.randn(shape.cout, shape.cin, generator=gen).to(dev, dtype)
        bn: tuple[Tensor, ...] = (torch.zeros(shape.cout, device=dev, dtype=dtype),)
        x_full = torch.randn(shape.batch, shape.cin, generator=gen).to(dev, dtype)
        return weight, bn, x_full
    if shape.groups_mode.startswith("tied:"):
        per_in = int(shape.groups_mode.split(":")[1])
    elif shape.groups_mode.startswith("fixed:"):
        per_in = shape.cin // int(shape.groups_mode.split(":")[1])
    else:
        per_in = shape.cin
    # randn * small scale: normal-range values, no denormals that would slow a CPU down
    weight = (torch.randn(shape.cout, per_in, *shape.kernel, generator=gen) * 0.05).to(dev, dtype)
    c = shape.cout
    bn = tuple(
        t.to(dev, dtype) for t in (torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c))
    )
    x_full = torch.randn(shape.batch, shape.cin, *shape.in_hw, generator=gen).to(dev, dtype)
    return weight, bn, x_full


def _grid(shape: LayerShape, round_to: int, max_points: int) -> tuple[list[int], list[int]]:
    step = _axis_step(shape, round_to)
    cins = axis_values(shape.cin, step, max_points) if shape.cin_varies else [shape.cin]
    couts = axis_values(shape.cout, step, max_points) if shape.cout_varies else [shape.cout]
    return cins, couts


def _points_for_budget(
    shapes: Mapping[str, LayerShape],
    probes: Mapping[str, tuple[float, float]],
    round_to: int,
    max_points: int,
    runs: int,
    budget_s: float,
) -> int:
    """Largest points-per-axis (<= max_points, >= 2) whose estimated build time fits the budget.

    ``probes[sig]`` = (ms at the smallest grid point, ms at full width); a point in between is
    estimated linearly in its channel product (small convs are not proportionally cheaper).
    """
    for p in range(max_points, 1, -1):
        est_ms = 0.0
        for sig, s in shapes.items():
            cins, couts = _grid(s, round_to, p)
            lo, hi = probes[sig]
            p_lo, p_hi = cins[0] * couts[0], s.cin * s.cout
            span = max(p_hi - p_lo, 1)
            est_ms += (
                sum(lo + (hi - lo) * (ci * co - p_lo) / span for ci in cins for co in couts) * runs
            )
        if est_ms / 1000 <= budget_s:
            return p
    return 2


def build_lut(
    layers: Sequence[Any],
    spec: Any,
    device: str | torch.device | None,
    round_to: int,
    max_points_per_axis: int | None = None,
    *,
    repeats: int | None = None,
    warmup: int | None = None,
    key: str = "",
    clock: str = "wall",
    time_budget_s: float | None = None,
) -> LatencyTable:
    """Measure the per-layer latency table of ``layers`` (``core.cost.LayerSpec``) on ``device``.

    ``spec`` is the recipe's latency block (batch_size, dtype, channels_last). Identical layer
    signatures are measured once. Each varying axis is sampled at ``round_to`` multiples: at most
    ``max_points_per_axis`` of them (default 6 on CPU, 12 on GPU), always including the smallest
    and the full width, and fewer when one timing of every full-width layer says the grid would
    not fit ``time_budget_s`` (default 30 s on CPU, 120 s on GPU; ``math.inf``: no limit).
    """
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    max_points = int(max_points_per_axis or (_GPU_POINTS if gpu else _CPU_POINTS))
    repeats = int(repeats or (_GPU_REPEATS if gpu else _CPU_REPEATS))
    warmup = int(warmup if warmup is not None else (_GPU_WARMUP if gpu else _CPU_WARMUP))
    budget_s = float(
        time_budget_s if time_budget_s is not None else (_GPU_BUDGET_S if gpu else _CPU_BUDGET_S)
    )
    batch = int(spec_value(spec, "batch_size", 1))
    channels_last = bool(spec_value(spec, "channels_last", False))
    dtype_name, note = effective_dtype(str(spec_value(spec, "dtype", "float32")), dev)
    dtype = DTYPES[dtype_name]

    shapes: dict[str, LayerShape] = {}
    for layer in layers:
        s = layer_shape(layer, batch)
        shapes.setdefault(s.signature, s)

    def point(s: LayerShape, t: tuple, ci: int, co: int, reps: int, warm: int) -> float:
        return _time_point(s, ci, co, t[0], t[1], t[2], dev, channels_last, reps, warm, clock)

    prev = torch.backends.cudnn.benchmark
    if gpu:
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    entries: dict[str, LutEntry] = {}
    try:
        if math.isfinite(budget_s):
            # time the smallest and the full point of every signature once to size the grid
            probes: dict[str, tuple[float, float]] = {}
            for sig, s in shapes.items():
                t = _entry_tensors(s, dev, dtype)
                cins, couts = _grid(s, round_to, 2)
                probes[sig] = (
                    point(s, t, cins[0], couts[0], 2, 1),
                    point(s, t, s.cin, s.cout, 2, 1),
                )
            spent = time.perf_counter() - t0
            max_points = _points_for_budget(
                shapes, probes, round_to, max_points, repeats + warmup, max(0.0, budget_s - spent)
            )
        for sig, s in shapes.items():
            cins, couts = _grid(s, round_to, max_points)
            t = _entry_tensors(s, dev, dtype)
            entries[sig] = LutEntry(
                cins, couts, [[point(s, t, ci, co, repeats, warmup) for co in couts] for ci in cins]
            )
    finally:
        torch.backends.cudnn.benchmark = prev
    meta = {
        "batch_size": batch,
        "dtype": dtype_name,
        "channels_last": channels_last,
        "round_to": int(round_to),
        "repeats": repeats,
        "max_points_per_axis": max_points,
        "clock": clock,
    }
    if note:
        meta["note"] = note
    return LatencyTable(
        key=key,
        device=device_name(dev),
        entries=entries,
        build_seconds=time.perf_counter() - t0,
        meta=meta,
    )


# --------------------------------------------------------------------------- the cost model


class LatencyCost:
    """``CostModel`` over a LatencyTable: ms = scale * sum_layers interp(cin, cout) + offset.

    ``cost(widths)`` is differentiable in the widths (bilinear interpolation between measured
    points, linear extrapolation past the ends so the gradient never vanishes at full width).
    All layers are evaluated in one batched gather — no per-layer Python in the training step.
    """

    metric = "latency"

    def __init__(self, layers: Sequence[Any], table: LatencyTable) -> None:
        self.table = table
        batch = int(table.meta.get("batch_size", 1))
        full = group_widths(layers)
        self.groups: list[str] = list(full)
        self.full_widths: dict[str, int] = full
        gidx = {g: i for i, g in enumerate(self.groups)}
        const = len(self.groups)  # index of the "use the full width" slot

        shapes = [layer_shape(layer, batch) for layer in layers]
        missing = [s.signature for s in shapes if s.signature not in table.entries]
        if missing:
            raise ValueError(
                f"latency table {table.key or '?'} lacks {len(missing)} layer(s), e.g. {missing[0]}"
            )
        grids = [self._padded(table.entries[s.signature]) for s in shapes]
        pi = max(len(g[0]) for g in grids)
        pj = max(len(g[1]) for g in grids)
        n = len(shapes)
        xi = torch.empty(n, pi, dtype=torch.float64)
        xj = torch.empty(n, pj, dtype=torch.float64)
        v = torch.zeros(n, pi, pj, dtype=torch.float64)
        ni = torch.empty(n, dtype=torch.long)
        nj = torch.empty(n, dtype=torch.long)
        for k, (ci, co, ms) in enumerate(grids):
            # pad axes with increasing values so searchsorted stays valid past a layer's last point
            xi[k] = torch.tensor(
                ci + [ci[-1] + 1 + t for t in range(pi - len(ci))], dtype=torch.float64
            )
            xj[k] = torch.tensor(
                co + [co[-1] + 1 + t for t in range(pj - len(co))], dtype=torch.float64
            )
            v[k, : len(ci), : len(co)] = torch.tensor(ms, dtype=torch.float64)
            ni[k], nj[k] = len(ci), len(co)
        tied = [s.groups_mode.startswith("tied:") for s in shapes]
        in_slot = torch.tensor(
            [
                gidx[la.in_group] if (la.in_group is not None and not t) else const
                for la, t in zip(layers, tied)
            ]
        )
        out_slot = torch.tensor(
            [gidx[la.out_group] if la.out_group is not None else const for la in layers]
        )
        self._cpu: dict[str, Tensor] = {
            "xi": xi,
            "xj": xj,
            "v": v,
            "ni": ni,
            "nj": nj,
            "in_slot": in_slot,
            "out_slot": out_slot,
            "rows": torch.arange(n),
            "cin_full": torch.tensor([float(s.cin) for s in shapes], dtype=torch.float64),
            "cout_full": torch.tensor([float(s.cout) for s in shapes], dtype=torch.float64),
            "full": torch.tensor([float(full[g]) for g in self.groups], dtype=torch.float64),
        }
        self._on: dict[torch.device, dict[str, Tensor]] = {}

    @staticmethod
    def _padded(e: LutEntry) -> tuple[list[float], list[float], list[list[float]]]:
        """A one-point (fixed) axis becomes two equal points: zero slope, same interpolation code."""
        ci, co = [float(v) for v in e.cin], [float(v) for v in e.cout]
        ms = [list(r) for r in e.ms]
        if len(ci) == 1:
            ci, ms = [ci[0], ci[0] + 1.0], [ms[0], list(ms[0])]
        if len(co) == 1:
            co, ms = [co[0], co[0] + 1.0], [[r[0], r[0]] for r in ms]
        return ci, co, ms

    def _buffers(self, device: torch.device) -> dict[str, Tensor]:
        # Grids and index tensors move to the widths' device once, not once per step.
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._on[device]

    def _width_vector(self, widths: Mapping[str, Tensor | float], device: torch.device) -> Tensor:
        """(groups + 1,) float64 widths in table order; absent groups at full width."""
        b = self._buffers(device)
        if not any(isinstance(v, Tensor) for v in widths.values()):
            # plain numbers (budget fitting): one tensor, no autograd graph to keep
            vals = [float(widths.get(g, self.full_widths[g])) for g in self.groups] + [0.0]
            return torch.tensor(vals, dtype=torch.float64, device=device)
        full = b["full"]
        w = torch.stack(
            [
                widths[g].to(device, torch.float64).reshape(())
                if isinstance(widths.get(g), Tensor)
                else (
                    torch.tensor(float(widths[g]), dtype=torch.float64, device=device)
                    if g in widths
                    else full[i]
                )
                for i, g in enumerate(self.groups)
            ]
        )
        return torch.cat([w, w.new_zeros(1)])

    @staticmethod
    def _interp_axis(x: Tensor, axes: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """Interval index per layer and the (unclamped, so extrapolating) position in it."""
        idx = (
            torch.searchsorted(axes, x.detach().unsqueeze(1).contiguous(), right=True).squeeze(1)
            - 1
        )
        idx = torch.minimum(idx.clamp_min(0), n - 2)
        x0 = axes.gather(1, idx.unsqueeze(1)).squeeze(1)
        x1 = axes.gather(1, (idx + 1).unsqueeze(1)).squeeze(1)
        return idx, (x - x0) / (x1 - x0)

    def raw(self, widths: Mapping[str, Tensor | float]) -> Tensor:
        """Uncalibrated sum of per-layer interpolated ms (what the calibration maps to a model)."""
        unknown = set(widths) - set(self.full_widths)
        if unknown:
            raise KeyError(f"unknown gate groups: {sorted(unknown)}")
        device = next(
            (w.device for w in widths.values() if isinstance(w, Tensor)), torch.device("cpu")
        )
        b = self._buffers(device)
        w = self._width_vector(widths, device)
        const = len(self.groups)
        cin = torch.where(b["in_slot"] == const, b["cin_full"], w[b["in_slot"]])
        cout = torch.where(b["out_slot"] == const, b["cout_full"], w[b["out_slot"]])
        i, t = self._interp_axis(cin, b["xi"], b["ni"])
        j, u = self._interp_axis(cout, b["xj"], b["nj"])
        v = b["v"]
        rows = b["rows"]
        per_layer = (
            (1 - t) * (1 - u) * v[rows, i, j]
            + t * (1 - u) * v[rows, i + 1, j]
            + (1 - t) * u * v[rows, i, j + 1]
            + t * u * v[rows, i + 1, j + 1]
        )
        return per_layer.clamp_min(0.0).sum()

    def cost(self, widths: Mapping[str, Tensor | float]) -> Tensor:
        """Predicted whole-model ms at ``widths`` (kept channels per group; absent = full).

        float64 0-dim tensor like the analytic cost models, differentiable in tensor widths.
        """
        return self.table.scale * self.raw(widths) + self.table.offset

    def baseline(self) -> float:
        """Predicted ms of the unpruned model."""
        return float(self.cost({}))


# --------------------------------------------------------------------------- calibration


def fit_calibration(
    table: LatencyTable, samples: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """Least-squares ``measured ≈ scale * predicted_raw + offset``; stored on the table.

    ``samples`` are (raw per-layer sum, measured whole-model ms) pairs, e.g. the baseline plus a
    few random-width exported models. The offset stands for per-model overhead (pooling, launch
    gaps), so it is kept in [0, 25% of the fastest measurement]: a handful of noisy samples over
    a narrow range would otherwise trade scale for a wild offset. One sample: scale only.
    """
    pts = [(float(x), float(y)) for x, y in samples if x > 0 and y > 0]
    if not pts:
        raise ValueError("fit_calibration needs at least one positive (predicted, measured) pair")
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    offset = my - sxy / sxx * mx if n >= 2 and sxx > 1e-12 * mx * mx else 0.0
    offset = min(max(offset, 0.0), 0.25 * min(y for _, y in pts))
    # best scale for that offset (least squares through the point (0, offset))
    scale = sum(x * (y - offset) for x, y in pts) / sum(x * x for x, _ in pts)
    if scale <= 0:  # only possible with absurd samples; fall back to the plain ratio
        scale, offset = sum(y for _, y in pts) / sum(x for x, _ in pts), 0.0
    table.scale, table.offset = float(scale), float(offset)
    errs = [abs(scale * x + offset - y) / y for x, y in pts]
    table.meta["calibration_samples"] = n
    table.meta["calibration_max_rel_err"] = max(errs)
    return table.scale, table.offset


def random_widths(
    full_widths: Mapping[str, int],
    step: Mapping[str, int] | int,
    rng: random.Random,
    low: float = 0.25,
) -> dict[str, int]:
    """A random width per group: a multiple of its step in [low * full, full], or full."""
    out: dict[str, int] = {}
    for g, full in full_widths.items():
        st = step[g] if isinstance(step, Mapping) else step
        ladder = [w for w in range(st, full, st) if w >= low * full] + [full]
        out[g] = rng.choice(ladder)
    return out


class WidthMeasurer:
    """``widths -> measured ms``: keeps the first channels of each group, exports, times.

    ``export_fn`` is the adapter's ``export_pruned``; ``groups`` the GateGroups being pruned
    (name, units, unit_width, min_units, round_units). Which channels survive does not change
    latency, only how many, so the first ones are kept.
    """

    def __init__(
        self,
        model: nn.Module,
        export_fn: Callable[[nn.Module, dict[str, Tensor]], nn.Module],
        groups: Sequence[Any],
        input_size: Sequence[int],
        spec: Any,
        device: str | torch.device | None,
        clock: str = "wall",
    ) -> None:
        self.model, self.export_fn, self.clock = model, export_fn, clock
        self.groups = {g.name: g for g in groups}
        self.input_size, self.spec, self.device = tuple(input_size), spec, device

    def keep_for(self, widths: Mapping[str, int]) -> dict[str, Tensor]:
        """First-channels keep realising ``widths`` (snapped up to whole units, floored)."""
        keep: dict[str, Tensor] = {}
        for name, g in self.groups.items():
            uw = int(g.unit_width)
            w = int(widths.get(name, g.units * uw))
            units = min(int(g.units), max(int(g.min_units), -(-w // uw)))
            keep[name] = torch.arange(units * uw)
        return keep

    def __call__(self, widths: Mapping[str, int]) -> float:
        pruned = self.export_fn(self.model, self.keep_for(widths))
        return measure_latency(
            pruned, self.input_size, self.spec, self.device, clock=self.clock
        ).median_ms

    def random_widths(self, rng: random.Random, low: float = 0.25) -> dict[str, int]:
        """Random exportable widths of the pruned groups (multiples of each group's step)."""
        full = {n: int(g.units) * int(g.unit_width) for n, g in self.groups.items()}
        step = {n: max(1, int(g.round_units)) * int(g.unit_width) for n, g in self.groups.items()}
        return random_widths(full, step, rng, low)


def make_width_measurer(
    model: nn.Module,
    export_fn: Callable[[nn.Module, dict[str, Tensor]], nn.Module],
    groups: Sequence[Any],
    input_size: Sequence[int],
    spec: Any,
    device: str | torch.device | None,
) -> WidthMeasurer:
    """The ``calibrate_with`` callable of ``get_or_build_lut`` for one model (see WidthMeasurer)."""
    return WidthMeasurer(model, export_fn, groups, input_size, spec, device)


def calibrate(
    table: LatencyTable,
    layers: Sequence[Any],
    measure_widths: Callable[[Mapping[str, int]], float],
    n_random: int = 4,
    seed: int = 0,
    passes: int = 2,
) -> tuple[float, float]:
    """Fit the table's scale/offset to the full model plus ``n_random`` random-width models.

    ``measure_widths(widths)`` exports the model at those channel counts and returns its
    measured median ms; when it is a WidthMeasurer only the groups it prunes are varied.
    """
    cost = LatencyCost(layers, table)
    rng = random.Random(seed)
    sampler = getattr(measure_widths, "random_widths", None)
    round_to = int(table.meta.get("round_to", 8))
    configs: list[dict[str, int]] = [{}]
    for _ in range(n_random):
        configs.append(sampler(rng) if sampler else random_widths(cost.full_widths, round_to, rng))
    # interleaved passes, fastest per config: a burst of host load hits one pass, not every one
    runs = [[float(measure_widths(w)) for w in configs] for _ in range(max(1, passes))]
    samples = [(float(cost.raw(w)), min(r[i] for r in runs)) for i, w in enumerate(configs)]
    return fit_calibration(table, samples)


# --------------------------------------------------------------------------- caching


class LutCache(Protocol):
    """Where built tables are kept between jobs (a folder for ``hawada run``, the DB in the worker)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


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
        """Store atomically (tmp file in the same folder, then rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".lut-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def lut_key(
    layers: Sequence[Any],
    spec: Any,
    device: str | torch.device | None,
    round_to: int,
    key_parts: Mapping[str, Any] | None = None,
    max_points_per_axis: int | None = None,
) -> str:
    """Cache key: hash of device name, caller's parts (arch, input size), latency settings, shapes."""
    dev = resolve_device(device)
    batch = int(spec_value(spec, "batch_size", 1))
    doc = {
        "v": LUT_VERSION,
        "device": device_name(dev),
        "parts": {str(k): v for k, v in sorted((key_parts or {}).items())},
        "batch": batch,
        "dtype": effective_dtype(str(spec_value(spec, "dtype", "float32")), dev)[0],
        "channels_last": bool(spec_value(spec, "channels_last", False)),
        "round_to": int(round_to),
        "points": max_points_per_axis,
        "layers": sorted({layer_shape(la, batch).signature for la in layers}),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:40]


def get_or_build_lut(
    layers: Sequence[Any],
    spec: Any,
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
