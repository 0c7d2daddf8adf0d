"""Measuring a latency table on the device that will run the model.

The latency of every conv/linear of the model is *measured* over a grid of (input channels,
output channels) at the widths the exporter can emit: multiples of `round_to` plus the full
width, as conv + BN + ReLU like a pruned block runs it. The grid shrinks to fit a time budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hawada.core.device import device_name, resolve_device
from hawada.core.latency import DTYPES, effective_dtype, summarize, time_callable
from hawada.core.layers import LayerSpec
from hawada.core.lut.table import (
    LatencyTable,
    LayerShape,
    LutEntry,
    axis_step,
    axis_values,
    layer_shape,
)
from hawada.core.recipe import LatencySpec

# Per grid point a few repeats suffice (the recipe's long run is for whole models): points are many.
_CPU_REPEATS, _CPU_WARMUP, _CPU_POINTS = 5, 1, 6
_GPU_REPEATS, _GPU_WARMUP, _GPU_POINTS = 20, 5, 12
_CPU_BUDGET_S, _GPU_BUDGET_S = 30.0, 120.0  # build-time budgets (grid shrinks to fit), with
# headroom: on a shared CPU the estimate from one probe timing can be off by half

#: A signature's full-width weight, its BN tensors and its full-width input.
_Tensors = tuple[Tensor, tuple[Tensor, ...], Tensor]


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

        def fn() -> Tensor:
            return F.linear(x, w, b)

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


def _entry_tensors(shape: LayerShape, dev: torch.device, dtype: torch.dtype) -> _Tensors:
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
    step = axis_step(shape, round_to)
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
    layers: Sequence[LayerSpec],
    spec: LatencySpec,
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
    """Measure the per-layer latency table of ``layers`` (``core.layers.LayerSpec``) on ``device``.

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
    batch, channels_last = spec.batch_size, spec.channels_last
    dtype_name, note = effective_dtype(spec.dtype, dev)
    dtype = DTYPES[dtype_name]

    shapes: dict[str, LayerShape] = {}
    for layer in layers:
        s = layer_shape(layer, batch)
        shapes.setdefault(s.signature, s)

    def point(s: LayerShape, t: _Tensors, ci: int, co: int, reps: int, warm: int) -> float:
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
    meta: dict[str, Any] = {
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
